"""Training and forecasting an ensemble: members folded into the batch, the afCRPS over them as
the loss (checked against a member-by-member brute force), and jobs.forecast's ensemble scores
(CRPS, ensemble-mean RMSE, spread/skill; a member axis in the written fields)."""

from __future__ import annotations

import csv
import functools
import importlib.util
from itertools import product
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir

from squall.graphs import build_graph
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.tracking import NullLogger
from squall.train.ensemble import loss_function
from squall.train.forecast import forecast
from squall.train.loop import Trainer, VariableLayout
from squall.train.runner import build_run, train

ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "name": "o8_l2",
    "nodes": {"data": {"type": "grid", "grid": "O8"},
              "hidden": {"type": "icosahedral", "level": 2}},
    "edges": {
        "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
        "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
        "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
    },
}  # fmt: skip
LAYOUT = VariableLayout.from_roles({"prognostic": [0, 1, 2], "forcing": [3], "diagnostic": [4]})
TRAINING = SimpleNamespace(lr=1e-3, weight_decay=0.0, warmup_steps=0, max_steps=10,
                           min_lr_ratio=1.0, precision="fp32", grad_clip=1.0)  # fmt: skip


@functools.cache
def tiny_graph():
    return build_graph(SPEC)


def make_trainer(members: int, alpha: float = 0.95, loss: str = "afcrps") -> Trainer:
    graph = tiny_graph()
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=16, num_heads=2, noise_channels=3, ensemble_members=members,
                      crps_alpha=alpha, ensemble_loss=loss)  # fmt: skip
    model = GraphForecaster(graph, cfg, len(LAYOUT.inputs), len(LAYOUT.outputs), 2,
                            LAYOUT.residual)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking model: the noise reaches the output
        for name, p in model.named_parameters():
            if ".noise." in name or name.startswith("head."):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return Trainer(model, LAYOUT, TRAINING, torch.device("cpu"), NullLogger())


def brute_afcrps(members: list[torch.Tensor], truth: torch.Tensor, alpha: float) -> torch.Tensor:
    """The O(M^2) definition, per point: sum over j != k of |x_j - y| + |x_k - y| - (1 - eps)
    |x_j - x_k|, over 2 M (M - 1), eps = (1 - alpha) / M."""
    m = len(members)
    eps = (1 - alpha) / m
    total = torch.zeros_like(truth, dtype=torch.float64)
    for j, k in product(range(m), repeat=2):
        if j != k:
            xj, xk, y = members[j].double(), members[k].double(), truth.double()
            total += (xj - y).abs() + (xk - y).abs() - (1 - eps) * (xj - xk).abs()
    return total / (2 * m * (m - 1))


def test_deterministic_models_keep_the_mse():
    assert loss_function(make_trainer(1).model) is None


@pytest.mark.parametrize("alpha", [0.95, 1.0])
def test_ensemble_loss_is_the_member_by_member_afcrps_over_the_rollout(alpha):
    """Two samples, three members, a two-step rollout: each member rolled out alone with the
    noise the folded batch drew for it, then scored by the O(M^2) definition, area-weighted."""
    trainer = make_trainer(3, alpha)
    model, b, m = trainer.model, 2, 3
    g = model.graph.num_data
    gen = torch.Generator().manual_seed(2)
    batch = {"x": torch.randn(b, 2, g, 5, generator=gen),
             "y": torch.randn(b, 2, g, 5, generator=gen)}
    torch.manual_seed(7)
    loss = trainer.rollout_loss(batch)
    torch.manual_seed(7)  # the same draws, in the same order: one [B * M] noise per step
    noises = [model.sample_noise(b * m) for _ in range(2)]
    area = model.graph.area.double()
    inputs, outputs = LAYOUT.inputs, LAYOUT.outputs
    want = 0.0
    with torch.no_grad():
        for r in range(2):
            per_sample = []
            for i in range(b):
                preds = []
                for j in range(m):
                    state = batch["x"][i : i + 1][..., inputs]
                    for step in range(r + 1):
                        pred = model(state, noise=noises[step][i * m + j : i * m + j + 1])
                        nxt = batch["y"][i : i + 1, step][..., inputs].clone()
                        nxt[..., LAYOUT.prognostic_in] = pred[..., LAYOUT.prognostic_out]
                        state = torch.cat([state[:, 1:], nxt[:, None]], 1)
                    preds.append(pred[0])
                crps = brute_afcrps(preds, batch["y"][i, r][..., outputs], alpha)
                per_sample.append((crps * area[:, None]).mean())
            want += sum(per_sample) / b / 2
    # fp32 forward and score against a float64 brute force of the same fp32 predictions: the
    # score's own rounding, a few eps per term summed over G * V points
    tol = 8 * torch.finfo(torch.float32).eps * float(want)
    assert abs(loss.item() - float(want)) <= tol
    loss.backward()
    noise_grads = [p.grad for n, p in model.named_parameters() if ".noise." in n]
    assert noise_grads and all(gr is not None and gr.abs().sum() > 0 for gr in noise_grads)


def test_energy_score_and_fair_crps_are_selectable():
    batch = {"x": torch.randn(1, 2, 544, 5), "y": torch.randn(1, 1, 544, 5)}
    losses = {}
    for name in ("afcrps", "fair_crps", "energy"):
        torch.manual_seed(3)
        losses[name] = make_trainer(4, 0.5, name).rollout_loss(batch).item()
    assert len(set(losses.values())) == 3 and all(v > 0 for v in losses.values())


# ----------------------------------------------------------------------------------------------
# jobs.forecast with an ensemble


def _tiny() -> list[str]:
    conftest = Path(__file__).with_name("conftest.py")
    spec = importlib.util.spec_from_file_location("_train_conftest", conftest)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY)


FORECAST = ("forecast.steps=3", "forecast.max_starts=2", "tracking.enabled=false")


def compose_tiny(cache: Path, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*_tiny(), f"paths.cache={cache}", *FORECAST, *extra])


ENS = ("model=tiny_ens", "model.num_channels=16", "model.num_heads=2",
       "training.run_dir=${paths.cache}/ens")  # fmt: skip
DET = ("training.run_dir=${paths.cache}/det",)


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory) -> Path:
    """A cache with 3-step checkpoints of a deterministic and an ensemble tiny model."""
    cache = tmp_path_factory.mktemp("ensemble")
    for extra in (DET, ENS):
        train(compose_tiny(cache, "training.max_steps=3", *extra), NullLogger())
    return cache


@pytest.mark.slow  # two tiny trainings, three forecasts: 13 s on 2 loaded cores
def test_ensemble_forecast_scores_its_written_members(trained_pair, tmp_path):
    cache = trained_pair
    out = tmp_path / "ens.zarr"
    cfg = compose_tiny(cache, *ENS, f"forecast.output={out}",
                       f"forecast.reference={cache}/det/checkpoint.pt")  # fmt: skip
    result = forecast(cfg)
    assert result["members"] == 4 and len(result["spread_skill"]) == 3
    store = zarr.open_group(str(out), mode="r")
    fields = store["data"][:]  # [start, step, member, variable, grid], own units
    assert store.attrs["layout"] == "data[start, step, member, variable, grid]"
    assert store.attrs["complete"] is True and fields.shape[:3] == (2, 3, 4)
    assert np.abs(fields[:, :, 0] - fields[:, :, 1]).max() > 0, "members differ"
    # the ensemble-mean RMSE in each variable's units, recomputed from the stored members
    parts = build_run(cfg, NullLogger(), training=False)
    from squall.data.setup import build_dataset

    data = build_dataset(cfg, "test", rollout=3, normaliser=parts.train_set.normaliser)
    starts = np.unique(np.linspace(0, len(data) - 1, 2).astype(int))
    names = list(store.attrs["variables"])
    area = parts.graph.nodes["data"].area.astype(np.float64)
    out_cols = [data.variables.index(v) for v in names]
    norm = parts.train_set.normaliser.subset(names)
    for v, rmse in result["rmse_by_variable"].items():
        c = names.index(v)
        sq = 0.0
        for n, k in enumerate(starts):
            truth = norm.denormalise(data[int(k)]["y"][:, :, out_cols]).numpy()  # [step, G, V]
            mean = fields[n].mean(axis=1)[:, c]  # [step, G]
            sq = sq + ((mean - truth[..., c]) ** 2 * area).mean(axis=1)
        assert np.allclose(np.sqrt(sq / len(starts)), rmse, rtol=1e-4)
    # reference and persistence scored from the same starts; a table row per lead time
    rows = list(csv.DictReader(open(result["csv"])))
    wanted = {"crps_model", "crps_reference", "crps_gain", "spread_skill"}
    assert len(rows) == 3 and wanted <= set(rows[0])
    det = forecast(compose_tiny(cache, *DET))
    assert np.allclose(result["crps_reference"], det["crps_model"], rtol=1e-6)
    assert np.allclose(result["rmse_reference"], det["rmse_model"], rtol=1e-6)
    assert np.allclose(result["crps_persistence"], det["crps_persistence"], rtol=1e-6)
    assert "spread_skill" not in det


@pytest.mark.slow
def test_a_reference_of_another_graph_is_refused(trained_pair, tmp_path):
    from squall.errors import ConfigError
    from squall.train.forecast import CheckpointMismatch

    cache = trained_pair
    with pytest.raises(ConfigError, match="not found"):
        forecast(compose_tiny(cache, *ENS, f"forecast.reference={tmp_path}/none.pt"))
    other = tmp_path / "other"
    train(compose_tiny(other, "training.max_steps=1", "graph.nodes.hidden.level=1",
                       "training.run_dir=${paths.cache}/det"), NullLogger())  # fmt: skip
    with pytest.raises(CheckpointMismatch, match="not trained on graph"):
        forecast(compose_tiny(cache, *ENS, f"forecast.reference={other}/det/checkpoint.pt"))


def _forecast_job_module():
    """tests/train/test_forecast_job.py (read by path), for its two-rank job launcher."""
    path = Path(__file__).with_name("test_forecast_job.py")
    spec = importlib.util.spec_from_file_location("_forecast_job_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two job processes and one in-process forecast of the tiny ensemble
def test_members_spread_over_two_ranks_score_and_write_what_one_process_does(
    trained_pair, tmp_path
):
    """Each rank draws its members' noise as one process does (keyed by seed, forward, sample)
    and runs the same per-member fp32 compute; the scores see the gathered members in member
    order: scores and fields are bitwise those of one process holding all 4 members."""
    import json

    job = _forecast_job_module()
    cache = trained_pair
    one_out, two_out = tmp_path / "one.zarr", tmp_path / "two.zarr"
    one = forecast(job.compose_tiny(cache, *ENS, f"forecast.output={one_out}",
                                    "tracking.enabled=false"))  # fmt: skip
    done = job._launch(cache, [*ENS, "parallel.ensemble=2", f"forecast.output={two_out}",
                               "tracking.enabled=false"], world=2)  # fmt: skip
    two = json.loads(done[0].stdout.strip().splitlines()[-1])
    assert two["ranks"] == 2 and two["members"] == 4
    for key in ("rmse_model", "crps_model", "spread", "spread_skill", "crps_persistence"):
        assert two[key] == one[key], key
    a, b = zarr.open_group(str(one_out), mode="r"), zarr.open_group(str(two_out), mode="r")
    assert b.attrs["complete"] is True and b.attrs["fields_written"] == 2 * 3 * 4
    assert np.array_equal(a["data"][:], b["data"][:])
    assert np.abs(b["data"][:, :, 0] - b["data"][:, :, 3]).max() > 0, "members differ"
