"""Forecast rollouts of a trained model, scored against the truth and against persistence.

A rollout starts from ``input_steps`` true states, then feeds each prediction back as the next
input (forcings come from the dataset, as in training). Scores are area-weighted RMSE over the
prognostic variables in normalised units, per lead time, for the model and for persistence
(repeating the initial state); ``skill = 1 - mse_model / mse_persistence``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from squall.data.setup import build_dataset
from squall.errors import ConfigError
from squall.tracking import NullLogger
from squall.train.checkpoint import load_checkpoint
from squall.train.loop import area_weighted_mse
from squall.train.runner import build_run

log = logging.getLogger(__name__)


@torch.no_grad()
def rollout(trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Predictions ``[B, steps, G, V_out]`` for windows ``x [B, T_in, G, V]``, ``y [B, steps, G, V]``."""
    preds = [pred for pred, _ in trainer.rollout({"x": x, "y": y})]
    return torch.stack(preds, 1)


def forecast(cfg) -> dict:
    """Roll the checkpointed model out as ``cfg.forecast`` says; return scores and timings."""
    f = cfg.forecast
    try:
        steps, max_starts = int(f.steps), int(f.max_starts)
    except (TypeError, ValueError):
        raise ConfigError(f"forecast.steps={f.steps!r} and forecast.max_starts={f.max_starts!r} "
                          "must be integers") from None  # fmt: skip
    if steps < 1:
        raise ConfigError(f"forecast.steps={steps} must be >= 1")
    ckpt = Path(str(f.checkpoint))
    if not ckpt.exists():  # before building data and model, which can take minutes
        raise ConfigError(f"checkpoint {ckpt} not found: train first (python -m jobs.train with "
                          "the same graph and model) or set forecast.checkpoint")  # fmt: skip
    parts = build_run(cfg, NullLogger(), training=False)
    load_checkpoint(ckpt, parts.model, restore_rng=False)
    trainer, model = parts.trainer, parts.model.eval()
    data = build_dataset(cfg, str(f.split), rollout=steps, normaliser=parts.train_set.normaliser)
    starts = np.unique(np.linspace(0, len(data) - 1, min(max_starts, len(data))).astype(int))
    prog_out = trainer.prog_out
    area = model.graph.area
    mse_model = np.zeros(steps)
    mse_persist = np.zeros(steps)
    seconds, predictions = [], []
    for k in starts:
        sample = data[int(k)]
        x, y = sample["x"][None].to(trainer.device), sample["y"][None].to(trainer.device)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pred = rollout(trainer, x, y)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        truth = y.index_select(-1, trainer.outputs)
        last = x[:, -1].index_select(-1, trainer.inputs)[..., trainer.prog_in]
        for s in range(steps):
            mse_model[s] += float(
                area_weighted_mse(pred[:, s, ..., prog_out], truth[:, s, ..., prog_out], area)
            )
            mse_persist[s] += float(area_weighted_mse(last, truth[:, s, ..., prog_out], area))
        predictions.append((int(sample["index"]), pred[0].float().cpu()))
    mse_model /= len(starts)
    mse_persist /= len(starts)
    hours = _step_hours(data)
    result = {
        "starts": len(starts),
        "steps": steps,
        "lead_hours": [hours * (s + 1) for s in range(steps)],
        "rmse_model": np.sqrt(mse_model).tolist(),
        "rmse_persistence": np.sqrt(mse_persist).tolist(),
        "skill": (1 - mse_model / mse_persist).tolist(),
        "rollout_s_median": float(np.median(seconds)),
        "step_s_median": float(np.median(seconds)) / steps,
    }
    if f.get("output"):
        result["output"] = str(write_forecasts(Path(str(f.output)), data, parts, predictions))
    return result


def _step_hours(data) -> float:
    return float(data.info.frequency / np.timedelta64(1, "h")) * data.stride


def write_forecasts(path: Path, data, parts, predictions) -> Path:
    """Denormalised forecasts as ``data[start, step, variable, grid]`` float32 in a zarr group,
    with the initial dates, lead times in hours and variable names as attributes."""
    import zarr

    out_vars = [data.variables[i] for i in parts.layout.outputs]
    norm = parts.train_set.normaliser.subset(out_vars)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    stacked = torch.stack([norm.denormalise(p) for _, p in predictions]).numpy().astype(np.float32)
    values = np.ascontiguousarray(stacked.transpose(0, 1, 3, 2))  # [start, step, variable, grid]
    root.create_array("data", data=values, chunks=(1, 1, *values.shape[2:]))
    root.attrs.update(
        variables=out_vars,
        initial_dates=[str(data.dates[i]) for i, _ in predictions],
        lead_hours=[_step_hours(data) * (s + 1) for s in range(stacked.shape[1])],
        layout="data[start, step, variable, grid]",
    )
    return path
