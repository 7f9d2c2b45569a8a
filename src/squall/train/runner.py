"""From a resolved config to a finished run: device -> graph -> data -> model -> training loop.

Used by ``jobs/train.py`` (and by the scaling job for one point).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from squall.data.setup import build_dataset, ensure_dataset, variable_roles
from squall.data.zarr_dataset import make_dataloader
from squall.errors import ConfigError
from squall.graphs import Graph, load_or_build
from squall.models.forecaster import GraphForecaster, ModelConfig, compile_blocks
from squall.train.loop import ResumableSampler, Trainer, VariableLayout

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device={name} but no CUDA device is visible; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"training.device={name!r}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator too
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def tendency_spread(dataset, layout: VariableLayout, max_windows: int = 32) -> list[float]:
    """RMS one-step change of each prognostic variable (normalised units) over evenly spaced
    training windows; 32 windows pin it to a few percent on the synthetic data."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(max_windows, len(dataset))).astype(int))
    prog = [layout.inputs[i] for i in layout.prognostic_in]
    sq = np.zeros(len(prog))
    for k in picks:
        sample = dataset[int(k)]
        change = sample["y"][0][:, prog] - sample["x"][-1][:, prog]
        sq += change.double().square().mean(0).numpy()
    return [float(max(v, 1e-6)) for v in np.sqrt(sq / len(picks))]


@dataclass
class RunParts:
    """What a run is built from, exposed for tests and the scaling job."""

    graph: Graph
    model: GraphForecaster
    trainer: Trainer
    train_set: object
    val_set: object
    layout: VariableLayout


def build_run(cfg, logger, device: torch.device | None = None) -> RunParts:
    """Build graph, datasets, model and trainer from ``cfg`` (nothing trained yet)."""
    t = cfg.training
    device = device or pick_device(str(t.device))
    seed_everything(int(t.seed), bool(t.deterministic))
    graph = load_or_build(cfg.graph, Path(cfg.paths.cache) / "graphs")
    ensure_dataset(cfg, graph.nodes["data"])
    rollout = int(t.rollout)
    train_set = build_dataset(cfg, "train", rollout=rollout)
    val_set = build_dataset(cfg, "validation", rollout=rollout, normaliser=train_set.normaliser)
    train_set.info.check_grid(len(graph.nodes["data"]), graph.nodes["data"].latlon)
    layout = VariableLayout.from_roles(variable_roles(cfg, train_set.variables))
    if not layout.prognostic_in:
        raise ConfigError("no prognostic variable: every variable is a forcing or a diagnostic")
    torch.manual_seed(int(t.seed))  # parameters identical whatever was drawn before
    model = GraphForecaster(
        graph, ModelConfig.from_cfg(cfg.model), len(layout.inputs), len(layout.outputs),
        train_set.input_steps, layout.residual, tendency_spread(train_set, layout),
    ).to(device)  # fmt: skip
    if bool(cfg.model.get("compile", False)):
        compile_blocks(model)
    run_dir = Path(str(t.run_dir))
    trainer = Trainer(model, layout, t, device, logger, run_dir / "checkpoint.pt")
    return RunParts(graph, model, trainer, train_set, val_set, layout)


def train(cfg, logger) -> dict:
    """Train as configured, resuming from ``run_dir/checkpoint.pt`` when allowed; return a summary."""
    parts = build_run(cfg, logger)
    t, model, trainer = cfg.training, parts.model, parts.trainer
    log.info(
        "model: %s parameters, %.3g GFLOP forward per sample; graph %s; %d training windows",
        f"{model.num_parameters():,}", model.flops_per_sample() / 1e9, parts.graph.name, len(parts.train_set),
    )  # fmt: skip
    if bool(t.resume):
        trainer.resume()
    workers = int(cfg.data.get("num_workers", 0))
    batch = int(t.batch_size)

    def make_loader(samples_seen: int):
        sampler = ResumableSampler(len(parts.train_set), int(t.seed), samples_seen)
        return make_dataloader(parts.train_set, batch_size=batch, num_workers=workers, sampler=sampler,
                               pin_memory=trainer.device.type == "cuda")  # fmt: skip

    val_loader = make_dataloader(parts.val_set, batch_size=batch, num_workers=0)
    summary = trainer.fit(make_loader, val_loader)
    summary.update(
        parameters=model.num_parameters(), gflop_per_sample=model.flops_per_sample() / 1e9
    )
    return summary
