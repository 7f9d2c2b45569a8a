"""Forecast rollouts of a trained model, scored against the truth and against persistence.

A rollout starts from ``input_steps`` true states, then feeds each prediction back as the next
input (forcings come from the dataset, as in training). Scores per lead time, for the model and
for persistence (repeating the initial state):

* area-weighted RMSE over the prognostic variables in **normalised units** (each variable
  divided by its training spread, so every variable weighs alike; dimensionless), and
  ``skill = 1 - mse_model / mse_persistence``;
* area-weighted RMSE of each prognostic variable in **its own units** (the dataset's; the
  normalised error times the variable's normalisation scale).

Before anything is built, the checkpoint is read and checked: one made on another graph (its
spec hash) or with another architecture is refused in one line. Scores go to a CSV beside the
checkpoint (``<run dir>/forecast/scores-step<step>-<split>.csv``) and to an MLflow run (one
metric per score, step = lead time in hours), nested under the training run when that is in the
same store.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from squall.config import to_container
from squall.data.setup import build_dataset
from squall.errors import ConfigError, SquallError
from squall.graphs.store import spec_hash, to_plain
from squall.models.forecaster import ModelConfig
from squall.progress import Progress
from squall.tracking import NullLogger, create_logger
from squall.tracking import metrics as M
from squall.tracking.experiment import layout_name, run_name
from squall.train.checkpoint import read_payload
from squall.train.runner import build_run

log = logging.getLogger(__name__)

UNITS = ("rmse_model and rmse_persistence: area-weighted RMSE over the prognostic variables in "
         "normalised units (dimensionless); rmse_<variable>: in that variable's own units")  # fmt: skip


class CheckpointMismatch(SquallError):
    """The checkpoint was trained on another graph or with another model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What the forecast evaluates: the file, its step and the run that trained it."""

    path: Path
    step: int
    run_id: str | None
    tracking_uri: str | None
    identity: dict | None

    def describe(self) -> str:
        """``PATH (step N, MLflow run ID)`` for the job's first line."""
        run = f", MLflow run {self.run_id}" if self.run_id else ", no MLflow run recorded"
        return f"{self.path} (step {self.step}{run})"


def read_checkpoint(path: Path) -> tuple[CheckpointInfo, dict]:
    """The checkpoint's description and its states (CPU tensors); one-line errors."""
    payload = read_payload(path, "train again (python -m jobs.train with the same graph and "
                           "model) or set forecast.checkpoint", ConfigError)  # fmt: skip
    extra = payload.get("extra") or {}
    info = CheckpointInfo(Path(path), int(payload.get("step", 0)), extra.get("mlflow_run_id"),
                          extra.get("tracking_uri"), payload.get("identity"))  # fmt: skip
    return info, payload


def expected_identity(cfg) -> dict:
    """The identity (see ``GraphForecaster.identity``) a model built from ``cfg`` would have."""
    spec = to_plain(cfg.graph)  # as squall.graphs.load_or_build hashes it
    return {"graph": {"name": spec.get("name"), "spec_hash": spec_hash(spec)},
            "model": ModelConfig.from_cfg(cfg.model).architecture()}  # fmt: skip


def check_identity(info: CheckpointInfo, cfg) -> None:
    """Refuse a checkpoint trained on another graph or with another architecture.

    Raises
    ------
    CheckpointMismatch
        One line naming what differs and how to fix it.
    """
    if info.identity is None:
        log.warning("checkpoint %s does not record its graph and model (written by an older "
                    "squall): cannot check that it fits graph=%s model=%s", info.path,
                    cfg.graph.name, cfg.model.name)  # fmt: skip
        return
    want = expected_identity(cfg)
    have_graph, want_graph = info.identity.get("graph", {}), want["graph"]
    if have_graph.get("spec_hash") != want_graph["spec_hash"]:
        raise CheckpointMismatch(
            f"checkpoint {info.path} was trained on graph {have_graph.get('name')} (spec "
            f"{have_graph.get('spec_hash')}), this forecast is on graph {want_graph['name']} "
            f"(spec {want_graph['spec_hash']}): give the training run's graph overrides or "
            "another forecast.checkpoint")  # fmt: skip
    have_model = info.identity.get("model", {})
    changed = [f"{k} {have_model.get(k)} != {v}" for k, v in want["model"].items()
               if have_model.get(k) != v]  # fmt: skip
    if changed:
        raise CheckpointMismatch(
            f"checkpoint {info.path} was trained with another model ({', '.join(changed)}; "
            f"checkpoint first): give the training run's model overrides or another "
            "forecast.checkpoint")  # fmt: skip


@torch.no_grad()
def rollout(trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Predictions ``[B, steps, G, V_out]`` for windows ``x [B, T_in, G, V]``, ``y [B, steps, G, V]``."""
    preds = [pred for pred, _ in trainer.rollout({"x": x, "y": y})]
    return torch.stack(preds, 1)


def _per_variable_mse(pred: torch.Tensor, truth: torch.Tensor, area: torch.Tensor) -> np.ndarray:
    """Area-weighted MSE of each variable, ``[V]``, for ``pred, truth [B, G, V]`` (fp32)."""
    err = (pred.float() - truth.float()).square() * area.float()[None, :, None]
    return err.mean(dim=(0, 1)).double().cpu().numpy()


def forecast(cfg) -> dict:
    """Roll the checkpointed model out as ``cfg.forecast`` says; score, record and return."""
    f = cfg.forecast
    try:
        steps, max_starts = int(f.steps), int(f.max_starts)
    except (TypeError, ValueError):
        raise ConfigError(f"forecast.steps={f.steps!r} and forecast.max_starts={f.max_starts!r} "
                          "must be integers") from None  # fmt: skip
    if steps < 1 or max_starts < 1:
        raise ConfigError(f"forecast.steps={steps} and forecast.max_starts={max_starts} must be "
                          ">= 1")  # fmt: skip
    ckpt = Path(str(f.checkpoint))
    if not ckpt.exists():  # before building data and model, which can take minutes
        raise ConfigError(f"checkpoint {ckpt} not found: train first (python -m jobs.train with "
                          "the same graph and model) or set forecast.checkpoint")  # fmt: skip
    info, payload = read_checkpoint(ckpt)
    check_identity(info, cfg)
    print(f"checkpoint: {info.describe()}", flush=True)

    parts = build_run(cfg, NullLogger(), training=False)
    try:
        parts.model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointMismatch(f"checkpoint {ckpt} does not fit this model "
                                 f"({str(err).splitlines()[0]})") from None  # fmt: skip
    del payload
    trainer, model = parts.trainer, parts.model.eval()
    data = build_dataset(cfg, str(f.split), rollout=steps, normaliser=parts.train_set.normaliser)
    starts = np.unique(np.linspace(0, len(data) - 1, min(max_starts, len(data))).astype(int))
    prog_out = trainer.prog_out
    out_vars = [data.variables[i] for i in parts.layout.outputs]
    prog_vars = [out_vars[i] for i in parts.layout.prognostic_out]
    scale = parts.train_set.normaliser.subset(prog_vars).scale.double().numpy()
    area = model.graph.area
    mse_model = np.zeros((steps, len(prog_vars)))
    mse_persist = np.zeros((steps, len(prog_vars)))
    seconds, predictions = [], []
    with Progress(len(starts), f"forecast ({steps} steps from each start)", unit="start") as bar:
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
            truth = y.index_select(-1, trainer.outputs)[..., prog_out]
            last = x[:, -1].index_select(-1, trainer.inputs)[..., trainer.prog_in]
            for s in range(steps):
                mse_model[s] += _per_variable_mse(pred[:, s, ..., prog_out], truth[:, s], area)
                mse_persist[s] += _per_variable_mse(last, truth[:, s], area)
            predictions.append((int(sample["index"]), pred[0].float().cpu()))
            bar.update()
    mse_model /= len(starts)
    mse_persist /= len(starts)
    hours = _step_hours(data)
    # The mean over variables of the per-variable MSE is area_weighted_mse over all of them.
    total_model, total_persist = mse_model.mean(axis=1), mse_persist.mean(axis=1)
    physical = np.sqrt(mse_model) * scale  # normalised error x the variable's scale
    result = {
        "checkpoint": str(info.path),
        "checkpoint_step": info.step,
        "trained_in_run": info.run_id,
        "starts": len(starts),
        "steps": steps,
        "lead_hours": [hours * (s + 1) for s in range(steps)],
        "rmse_model": np.sqrt(total_model).tolist(),
        "rmse_persistence": np.sqrt(total_persist).tolist(),
        "skill": (1 - total_model / total_persist).tolist(),
        "rmse_by_variable": {v: physical[:, i].tolist() for i, v in enumerate(prog_vars)},
        "units": UNITS,
        "rollout_s_median": float(np.median(seconds)),
        "step_s_median": float(np.median(seconds)) / steps,
    }
    if f.get("output"):
        result["output"] = str(write_forecasts(Path(str(f.output)), data, parts, predictions))
    result["csv"] = str(write_scores(result, ckpt.parent / "forecast"
                                     / f"scores-step{info.step}-{f.split}.csv"))  # fmt: skip
    record(cfg, result, info)
    return result


def _step_hours(data) -> float:
    return float(data.info.frequency / np.timedelta64(1, "h")) * data.stride


def write_scores(result: dict, path: Path) -> Path:
    """One row per lead time: normalised RMSE of model and persistence, skill, and each
    variable's RMSE in its own units (column ``rmse_<variable>``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result["rmse_by_variable"])
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["lead_hours", "rmse_model", "rmse_persistence", "skill",
                         *(f"rmse_{v}" for v in names)])  # fmt: skip
        for s, hours in enumerate(result["lead_hours"]):
            writer.writerow([hours, result["rmse_model"][s], result["rmse_persistence"][s],
                             result["skill"][s],
                             *(result["rmse_by_variable"][v][s] for v in names)])  # fmt: skip
    return path


def record(cfg, result: dict, info: CheckpointInfo) -> None:
    """The scores as an MLflow run: one metric per score at step = lead time in hours; the CSV
    as an artifact; nested under the training run when that run is in the same store."""
    from squall.tracking import resolve_tracking_uri

    tracking = to_container(cfg.tracking) or {}
    store = Path(str(cfg.paths.cache)) / "mlflow"
    same_store = (info.run_id is not None and info.tracking_uri is not None
                  and info.tracking_uri == resolve_tracking_uri(tracking.get("uri"), store))  # fmt: skip
    tags = {"job": "forecast", "squall.checkpoint": str(info.path),
            "squall.checkpoint_step": info.step, "squall.units": UNITS}  # fmt: skip
    if info.run_id is not None:
        tags["squall.trained_in_run"] = info.run_id
    name = run_name("forecast", str(cfg.graph.name), str(cfg.model.name), layout_name(1, 1))
    with create_logger(tracking, store_dir=store, run_name=name, tags=tags,
                       parent_run_id=info.run_id if same_store else None) as logger:  # fmt: skip
        if logger.run_id is None:  # tracking.enabled=false
            return
        logger.log_params({"forecast": to_container(cfg.forecast), "graph.name": cfg.graph.name,
                           "graph.spec_hash": expected_identity(cfg)["graph"]["spec_hash"],
                           "model": to_container(cfg.model), "checkpoint.step": info.step})  # fmt: skip
        for s, hours in enumerate(result["lead_hours"]):
            metrics = {M.FORECAST_RMSE_NORM: result["rmse_model"][s],
                       M.FORECAST_RMSE_PERSISTENCE_NORM: result["rmse_persistence"][s],
                       M.FORECAST_SKILL: result["skill"][s]}  # fmt: skip
            metrics.update({M.forecast_rmse(v): values[s]
                            for v, values in result["rmse_by_variable"].items()})  # fmt: skip
            logger.log_metrics(metrics, step=int(round(hours)))
        logger.log_artifact(result["csv"], "forecast")
        result["mlflow_run_id"], result["tracking_uri"] = logger.run_id, logger.tracking_uri


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
