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
import torch.distributed as dist

from squall.data.setup import build_dataset, ensure_dataset, variable_roles
from squall.data.zarr_dataset import make_dataloader
from squall.errors import ConfigError
from squall.graphs import Graph, load_or_build
from squall.models.forecaster import GraphForecaster, ModelConfig, compile_blocks
from squall.parallel.estimate import describe_checkpointing, estimate
from squall.parallel.parallelize import (
    ParallelConfig,
    ParallelSetup,
    parallelize,
    prepare_parallel,
    reduce_loss,
)  # fmt: skip
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
    parallel: ParallelSetup | None  # None unless built with distribute=True


def build_run(
    cfg,
    logger,
    device: torch.device | None = None,
    distribute: bool = False,
    training: bool = True,
) -> RunParts:
    """Build graph, datasets, model and trainer from ``cfg`` (nothing trained yet).

    With ``distribute`` (after ``init_distributed``, or in one process), ``cfg.parallel`` decides
    the layout:
    with ``model_parallel > 1`` (or mapper ``chunks > 1``) the model is sharded in place by
    :func:`squall.parallel.parallelize.parallelize` and each rank reads its own grid rows; the
    remaining ranks are data-parallel replicas (DDP when there is no model parallelism).
    ``training=False`` (forecasts) skips planning checkpointing for ``checkpoint.budget_gib``:
    nothing is kept for a backward.
    """
    t = cfg.training
    device = device or pick_device(str(t.device))
    seed_everything(int(t.seed), bool(t.deterministic))
    graph = load_or_build(cfg.graph, Path(cfg.paths.cache) / "graphs")
    ensure_dataset(cfg, graph.nodes["data"])
    setup = prepare_parallel(cfg, graph) if distribute else None
    rows = setup.grid_indices if setup is not None else None
    rollout = int(t.rollout)
    train_set = build_dataset(cfg, "train", rollout=rollout, grid_indices=rows)
    val_set = build_dataset(cfg, "validation", rollout=rollout, normaliser=train_set.normaliser,
                            grid_indices=rows)  # fmt: skip
    layout = VariableLayout.from_roles(variable_roles(cfg, train_set.variables))
    if not layout.prognostic_in:
        raise ConfigError("no prognostic variable: every variable is a forcing or a diagnostic")
    # Tendency spread from the full grid, so every rank of a model group scales alike.
    spread_set = train_set if rows is None else build_dataset(cfg, "train", rollout=rollout)
    mcfg = ModelConfig.from_cfg(cfg.model)
    if mcfg.checkpoint_budget_gib is not None and training:
        mcfg = resolve_checkpointing(graph, mcfg, setup, int(t.batch_size), layout,
                                     train_set.input_steps, device, str(t.precision), rollout)  # fmt: skip
    sharded = setup is not None and (setup.config.model_parallel > 1 or setup.config.chunks > 1)
    if mcfg.compile and sharded:
        log.warning("model.compile has no effect on sharded or chunked blocks: they run through "
                    "their project / attend / update steps, outside the compiled forward")  # fmt: skip
    torch.manual_seed(int(t.seed))  # parameters identical whatever was drawn before
    model = GraphForecaster(
        graph, mcfg, len(layout.inputs), len(layout.outputs),
        train_set.input_steps, layout.residual, tendency_spread(spread_set, layout),
    ).to(device)  # fmt: skip
    if mcfg.compile:
        compile_blocks(model)
    groups, wrapped = (setup.groups if setup is not None else None), None
    distributed = groups is not None and groups.layout.world_size > 1
    if setup is not None and (setup.config.model_parallel > 1 or setup.config.chunks > 1):
        parallelize(model, graph, setup.config, groups)
    elif distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    run_dir = Path(str(t.run_dir))
    trainer = Trainer(
        model, layout, t, device, logger, run_dir / "checkpoint.pt", wrapped=wrapped,
        reduce=(lambda x: reduce_loss(x, groups)) if distributed else None,
        is_main=not distributed or dist.get_rank() == 0,
        agree=(lambda flag: _any_rank(flag, device)) if distributed else None,
        barrier=dist.barrier if distributed else None,
    )  # fmt: skip
    return RunParts(graph, model, trainer, train_set, val_set, layout, setup)


def resolve_checkpointing(graph, mcfg, setup, batch, layout, input_steps, device, precision,
                          rollout=1):  # fmt: skip
    """Checkpoint policies chosen for ``checkpoint.budget_gib`` on this run's layout (logged)."""
    configured = {mcfg.checkpoint_encoder, mcfg.checkpoint_decoder,
                  *(mcfg.checkpoint_processor if isinstance(mcfg.checkpoint_processor, tuple)
                    else (mcfg.checkpoint_processor,))}  # fmt: skip
    if configured != {"none"}:
        log.warning("model.checkpoint.budget_gib is set: the planner's policies replace the "
                    "configured encoder / processor / decoder ones")  # fmt: skip
    pcfg = setup.config if setup is not None else ParallelConfig()
    world = setup.groups.layout.world_size if setup is not None and setup.groups else 1
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    *_, mcfg = estimate(graph, mcfg, pcfg, world, batch, (len(layout.inputs),
                        len(layout.outputs)), input_steps, 2 if bf16 else 4, rollout)  # fmt: skip
    log.info(
        "%s (for checkpoint.budget_gib=%g)",
        describe_checkpointing(mcfg),
        mcfg.checkpoint_budget_gib,
    )
    return mcfg


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank has ``flag`` set (one tiny all-reduce)."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train(cfg, logger) -> dict:
    """Train as configured, resuming from ``run_dir/checkpoint.pt`` when allowed; return a summary."""
    parts = build_run(cfg, logger, distribute=True)
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
        sampler = ResumableSampler(len(parts.train_set), int(t.seed), samples_seen,
                                   parts.parallel.data_parallel_rank, parts.parallel.data_parallel_size)  # fmt: skip
        return make_dataloader(parts.train_set, batch_size=batch, num_workers=workers, sampler=sampler,
                               pin_memory=trainer.device.type == "cuda")  # fmt: skip

    val_loader = make_dataloader(parts.val_set, batch_size=batch, num_workers=0)
    summary = trainer.fit(make_loader, val_loader)
    summary.update(
        parameters=model.num_parameters(), gflop_per_sample=model.flops_per_sample() / 1e9
    )
    return summary
