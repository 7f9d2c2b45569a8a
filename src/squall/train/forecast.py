"""Forecast rollouts of a trained model, scored against the truth and against persistence.

A rollout starts from ``input_steps`` true states, then feeds each prediction back as the next
input (forcings come from the dataset, as in training). Scores per lead time, for the model and
for persistence (repeating the initial state):

* area-weighted RMSE over the prognostic variables in **normalised units** (each variable
  divided by its training spread, so every variable weighs alike; dimensionless), and
  ``skill = 1 - mse_model / mse_persistence``;
* area-weighted RMSE of each prognostic variable in **its own units** (the dataset's; the
  normalised error times the variable's normalisation scale).

An ensemble model (``model.ensemble.members > 1``) is rolled out with its members folded into the
batch, each member feeding back its own prediction, and is scored per lead time by the
ensemble-mean RMSE, the CRPS (fair CRPS over the members; a single forecast's CRPS is its
absolute error, so persistence and deterministic models get the same score) and the
spread/skill ratio ``sqrt((M + 1) / M) * spread / rmse`` (1 for a calibrated ensemble). With
``forecast.reference`` (a deterministic checkpoint trained on the same data) that model is rolled
out from the same starts and scored alongside; ``crps_gain`` is ``1 - crps_model /
crps_reference``.

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
import torch.distributed as dist

from squall.config import to_container
from squall.data.setup import build_dataset
from squall.errors import ConfigError, SquallError
from squall.graphs.store import spec_hash, to_plain
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.progress import Progress
from squall.tracking import NullLogger, create_logger, peak_memory
from squall.tracking import metrics as M
from squall.tracking.experiment import layout_name, run_name
from squall.train.boundary import LamEvaluation
from squall.train.checkpoint import read_payload
from squall.train.ensemble import fold_members, unfold_members
from squall.train.forecast_store import (  # noqa: F401 - FieldWriter, ForecastWriteError: API
    FieldWriter,
    ForecastWriteError,
    create_store,
    finish_store,
)
from squall.train.runner import build_run
from squall.train.scores import afcrps_pointwise
from squall.train.signals import StopSignals

log = logging.getLogger(__name__)

UNITS = ("rmse_model and rmse_persistence: area-weighted RMSE over the prognostic variables in "
         "normalised units (dimensionless); rmse_<variable>: in that variable's own units; crps "
         "and spread: normalised units; spread_skill: dimensionless")  # fmt: skip

#: Scores a rollout sums per lead time and prognostic variable (area-weighted means over the
#: grid): squared error of the (ensemble-mean) forecast, CRPS, unbiased member variance (0 for one
#: member), and persistence's squared and absolute error.
SCORE_KEYS = ("mse", "crps", "var", "mse_persistence", "crps_persistence")


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


# ----------------------------------------------------------------------------------------------
# How a step runs: precision, inference mode, CUDA graphs
# ----------------------------------------------------------------------------------------------

#: Eager forwards on a side stream before a CUDA graph is captured: the first runs Triton's
#: autotuning and cuBLAS's workspace set-up, which must not happen inside the capture; the
#: second checks that nothing allocates differently once warm (PyTorch's CUDA-graph notes use 3
#: for DDP, whose first iterations build buckets: squall's step builds nothing).
CAPTURE_WARMUP = 2


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``forecast.precision`` on ``device`` (``None``: plain fp32).

    ``auto`` is bf16 on a GPU and fp32 on a CPU (where bf16 matrix products are slow and fp32
    outputs are what the tests compare bitwise).
    """
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"forecast.precision={precision!r}: choose auto, bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else None


class ModelStep:
    """One forward of the model, ``state [B, T_in, G_local, V_in] -> [B, G_local, V_out]``,
    without autograd (``torch.inference_mode``) and under autocast when ``dtype`` is set.

    With ``cuda_graphs`` on a CUDA device the forward is captured once into a CUDA graph
    (after :data:`CAPTURE_WARMUP` eager forwards on a side stream) and replayed every step: one
    launch instead of a few hundred kernel launches per step. The replayed output lives in the
    graph's static buffer, overwritten by the next replay: whatever reads it must be queued on
    the same stream before the next call (the rollout below does all its work on the current
    stream). A capture that fails (an operation that cannot be captured, e.g. a host sync in a
    communication op) is logged and the step runs eagerly; on a CPU the option is a no-op, said
    once in the log.
    """

    def __init__(self, model, device: torch.device, dtype: torch.dtype | None,
                 cuda_graphs: bool) -> None:  # fmt: skip
        self.model, self.device, self.dtype = model, device, dtype
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in = self.static_out = None
        self.captured = False
        self.want_graph = bool(cuda_graphs) and device.type == "cuda"
        if cuda_graphs and device.type != "cuda":
            log.info("forecast.cuda_graphs: no CUDA device, the step runs eagerly on %s", device)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16,
                            enabled=self.dtype is not None):  # fmt: skip
            return self.model(state)

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        if self.want_graph and not self.captured:
            self.captured = True
            self._capture(state)
        if self.graph is None:
            return self.forward(state)
        self.static_in.copy_(state)
        self.graph.replay()
        return self.static_out

    def _capture(self, state: torch.Tensor) -> None:
        try:
            static_in = state.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP):
                    self.forward(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.forward(static_in)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
            torch.cuda.synchronize(self.device)
            log.warning("forecast.cuda_graphs: capture failed (%s: %s); the step runs eagerly",
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")  # fmt: skip
            return
        self.graph, self.static_in, self.static_out = graph, static_in, static_out
        log.info("forecast.cuda_graphs: step captured into a CUDA graph")


# ----------------------------------------------------------------------------------------------
# The rollout
# ----------------------------------------------------------------------------------------------


@dataclass
class RolloutTimes:
    """Seconds of every rollout step (device time on a GPU: CUDA events, read once at the end)."""

    step_s: list[float]
    total_s: float  # first step to the last field on disk
    write_wait_s: float  # the rollout blocked on the writer (a full queue)


class StepClock:
    """Per-step times without a host sync per step: CUDA events on a GPU (read at the end),
    the wall clock on a CPU (where every operation is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self, pairs: list[tuple[int, int]]) -> list[float]:
        """Seconds between marks ``(i, j)`` of each pair."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[i].elapsed_time(self.marks[j]) / 1e3 for i, j in pairs]
        return [self.marks[j] - self.marks[i] for i, j in pairs]


class Rollout:
    """Autoregressive rollout of a (possibly sharded) model over the full grid's fields.

    A start's ``x [1, T_in, G, V]`` and ``y [1, steps, G, V]`` (the dataset's columns, full grid)
    are cut to this rank's grid rows (all rows for an unsharded model); each step's prediction on
    those rows is gathered to the full grid (``model.gather`` for a sharded model), scored
    against the truth with the full grid's cell areas, handed to the writer, and fed back as the
    next input's prognostic variables (forcings from ``y``, as in training).

    Parameters
    ----------
    model : GraphForecaster or ParallelForecaster
    layout : VariableLayout
    area : torch.Tensor
        ``[G]`` cell areas of the full grid (mean 1), on the device.
    rows : numpy.ndarray or None
        This rank's grid rows, ascending (``None``: the whole grid).
    step : ModelStep
    """

    def __init__(self, model, layout, area: torch.Tensor, rows, step: ModelStep) -> None:
        device = area.device
        self.model, self.step, self.area, self.device = model, step, area.float(), device
        self.inputs = torch.tensor(layout.inputs, device=device)
        self.outputs = torch.tensor(layout.outputs, device=device)
        self.prog_in = torch.tensor(layout.prognostic_in, device=device)
        self.prog_out = torch.tensor(layout.prognostic_out, device=device)
        self.rows = None if rows is None else torch.as_tensor(np.asarray(rows), device=device)
        self.gather = getattr(getattr(model, "runner", None), "gather", None)
        self.boundary = None  # squall.train.boundary.BoundaryForcing of a driven limited area

    def _mse(self, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Area-weighted MSE per variable ``[V]`` (float64) of ``[B, G, V]`` fields, on device."""
        err = (pred.float() - truth.float()).square() * self.area[None, :, None]
        return err.mean(dim=(0, 1)).double()

    def _mean(self, field: torch.Tensor) -> torch.Tensor:
        """Area-weighted mean per variable ``[V]`` (float64) of a ``[B, G, V]`` field."""
        return (field.float() * self.area[None, :, None]).mean(dim=(0, 1)).double()

    @torch.inference_mode()
    def run(self, x: torch.Tensor, y: torch.Tensor, on_step=None, members: int = 1,
            boundary: torch.Tensor | None = None, member_gather=None,
            ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Roll out ``members`` forecasts from one start; returns each of :data:`SCORE_KEYS`
        per step and prognostic variable, ``[steps, P]`` float64 on the device.

        The members are batch rows of one forward (an ensemble model draws each its own noise
        at every step; a deterministic model gives ``members`` equal forecasts).

        ``x`` is moved to the device whole; ``y`` may stay in (pinned) host memory: one step of
        it is copied at a time, so a long rollout's truth (60 steps of o320 with 100 variables:
        10 GB) does not sit on the GPU. ``on_step(s, field)`` is called with each step's
        full-grid predictions ``[members, G, V_out]`` (valid until the next step is queued on the
        device's stream).

        With the members spread over an ensemble group, ``members`` is this rank's share and
        ``member_gather`` (``model.member_gather``) all-gathers ``[1, m, G, P]`` into every
        member of the group, in member order, for the scores; ``on_step`` gets this rank's.
        """
        steps = y.shape[1]
        x = x.to(self.device)
        last = x[:, -1].index_select(-1, self.inputs).index_select(-1, self.prog_in)
        if self.rows is not None:
            x = x.index_select(2, self.rows)
        state = fold_members(x.index_select(-1, self.inputs), members)
        if self.boundary is not None:  # the driver's [T, P, V] of this start
            forced = {"boundary": fold_members(boundary[None], members)}
            state = self.boundary.force_inputs(state, forced)
        out = {k: torch.zeros(steps, len(self.prog_out), dtype=torch.float64, device=self.device)
               for k in SCORE_KEYS}  # fmt: skip
        for s in range(steps):
            y_s = y[:, s].to(self.device, non_blocking=True)  # [B, G, V] full grid
            truth = y_s.index_select(-1, self.outputs).index_select(-1, self.prog_out)
            pred = self.step(state)
            full = pred if self.gather is None else self.gather(pred)
            ens = unfold_members(full.index_select(-1, self.prog_out).float(), members)
            if member_gather is not None:
                ens = member_gather(ens)
            out["mse"][s] = self._mse(ens.mean(dim=1), truth)
            if ens.shape[1] > 1:
                out["crps"][s] = self._mean(afcrps_pointwise(ens, truth, alpha=1.0))
                out["var"][s] = self._mean(ens.var(dim=1, unbiased=True))
            else:
                out["crps"][s] = self._mean((ens[:, 0] - truth.float()).abs())
            out["mse_persistence"][s] = self._mse(last, truth)
            out["crps_persistence"][s] = self._mean((last.float() - truth.float()).abs())
            if on_step is not None:
                on_step(s, full)
            if s + 1 < steps:
                if self.rows is not None:
                    y_s = y_s.index_select(1, self.rows)
                nxt = fold_members(y_s.index_select(-1, self.inputs), members)
                nxt = nxt.index_copy(-1, self.prog_in,
                                     pred.index_select(-1, self.prog_out).to(nxt.dtype))  # fmt: skip
                if self.boundary is not None:
                    nxt = self.boundary.force_next(nxt, forced, s + 1)
                state = torch.cat([state[:, 1:], nxt.unsqueeze(1)], dim=1)
        return out


def _rank_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def forecast(cfg) -> dict:
    """Roll the checkpointed model out as ``cfg.forecast`` says; score, record and return.

    Runs on every rank of an initialised process group (``cfg.parallel``: model-parallel ranks
    share each start's graph, data-parallel replicas take every n-th start); every rank returns
    the same scores, global rank 0 writes the CSV and the MLflow run.
    """
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
    rank, world = _rank_info()
    if rank == 0:
        print(f"checkpoint: {info.describe()}", flush=True)

    parts = build_run(cfg, NullLogger(), training=False, distribute=True)
    try:
        parts.model.load_state_dict(payload["model"])
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, not the heading
        hint = ("; a limited-area model's inputs depend on data.boundary.enabled and "
                "data.boundary.lookahead: forecast with the overrides it was trained with"
                if parts.graph.boundary_mask() is not None else "")  # fmt: skip
        raise CheckpointMismatch(f"checkpoint {ckpt} does not fit this model ({detail}){hint}"
                                 ) from None  # fmt: skip
    del payload
    model, device = parts.model.eval(), parts.trainer.device
    dtype = autocast_dtype(str(f.get("precision", "auto")), device)
    setup = parts.parallel
    groups = setup.groups
    members = ModelConfig.from_cfg(cfg.model).ensemble_members
    # an ensemble group rolls out its members' share each (model.local_members, from
    # parallelize), numbered from ensemble rank x share, and gathers them for the scores
    local = int(getattr(model, "local_members", members))
    first = groups.ensemble_rank * local
    member_gather = getattr(model, "member_gather", None)
    reference = None
    if f.get("reference"):
        if setup.grid_indices is not None:
            raise ConfigError("forecast.reference runs the reference model on one process's "
                              "whole grid: use parallel.model_parallel=1 with it")  # fmt: skip
        reference = load_reference(Path(str(f.reference)), cfg, parts, device)
        if rank == 0:
            print(f"reference: {reference[1].describe()}", flush=True)
    dp_rank, dp_size = groups.data_rank, groups.layout.data_parallel
    writes_fields = groups.model_rank == 0  # one rank of each model group writes its starts
    # the ranks of an ensemble group score the same gathered members: one of them sums them
    sums_scores = writes_fields and groups.ensemble_rank == 0

    data = build_dataset(cfg, str(f.split), rollout=steps, normaliser=parts.train_set.normaliser)
    starts = np.unique(np.linspace(0, len(data) - 1, min(max_starts, len(data))).astype(int))
    mine = list(range(len(starts)))[dp_rank::dp_size]
    out_vars = [data.variables[i] for i in parts.layout.outputs]
    prog_vars = [out_vars[i] for i in parts.layout.prognostic_out]
    scale = parts.train_set.normaliser.subset(prog_vars).scale.double().numpy()
    area = torch.from_numpy(parts.graph.nodes["data"].area.astype(np.float32)).to(device)
    step = ModelStep(model, device, dtype, bool(f.get("cuda_graphs", False)))
    roll = Rollout(model, parts.layout, area, setup.grid_indices, step)
    ref_roll = None
    if reference is not None:
        ref_roll = Rollout(reference[0], parts.layout, area, None,
                           ModelStep(reference[0], device, dtype, False))  # fmt: skip
    lam = LamEvaluation.setup(parts, data, roll, ref_roll)  # None unless a limited area
    if lam is not None and member_gather is not None:
        raise ConfigError(f"parallel.ensemble={groups.layout.ensemble}: a limited-area forecast "
                          "scores every member on one rank; use parallel.ensemble=1")  # fmt: skip
    hours = _step_hours(data)

    output = Path(str(f.output)) if f.get("output") else None
    writer = None
    if output is not None:
        if rank == 0:
            member_axis = (members,) if members > 1 else ()
            # a forecast's initial date is its last input state's, which lead times count from
            based = [data.dates[data.window_times(int(k))[data.input_steps - 1]] for k in starts]
            create_store(output, (len(starts), steps, *member_axis, len(out_vars), len(area)), {
                "variables": out_vars, "initial_dates": [str(d) for d in based],
                "lead_hours": [hours * (s + 1) for s in range(steps)],
            }, str(f.get("compression", "none")))  # fmt: skip
        if world > 1:
            dist.barrier()
        if writes_fields:
            norm = parts.train_set.normaliser.subset(out_vars)
            writer = FieldWriter(output, device, norm, int(f.get("write_queue", 4)))

    sums = {k: torch.zeros(steps, len(prog_vars), dtype=torch.float64, device=device)
            for k in SCORE_KEYS}  # fmt: skip
    ref_sums = {k: torch.zeros_like(v) for k, v in sums.items()}
    clock = StepClock(device)
    pairs, error = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    # SIGTERM or SIGUSR1 (scancel, preemption, Slurm's time-limit warning) ends the rollout as an
    # error does: the fields already handed to the writer reach the disk, the store says how many
    stop = StopSignals().__enter__()
    try:
        with Progress(len(mine) * steps, f"forecast ({len(mine)} starts x {steps} steps of "
                      f"{hours:g} h)", unit="step") as bar:  # fmt: skip
            host_last = time.perf_counter()
            for n, i in enumerate(mine):
                sample = data[int(starts[i])]
                x, y = sample["x"][None], sample["y"][None]
                if device.type == "cuda":  # copied one step at a time, asynchronously
                    y = y.pin_memory()
                clock.mark()

                def on_step(s, field, i=i, n=n):
                    nonlocal host_last
                    if writer is not None:
                        for member in range(field.shape[0]):
                            writer.put(i, s, field[member],
                                       first + member if members > 1 else None)  # fmt: skip
                    clock.mark()
                    pairs.append((len(clock.marks) - 2, len(clock.marks) - 1))
                    now = time.perf_counter()
                    per_step, host_last = now - host_last, now
                    left = (len(mine) - n - 1) * steps + steps - s - 1
                    bar.set_postfix(f"start {n + 1}/{len(mine)}, lead {hours * (s + 1):g} h, "
                                    f"{per_step:.3g} s/step, ETA {left * per_step:.0f} s")  # fmt: skip
                    bar.update()

                scores = roll.run(x, y, on_step, local, sample.get("boundary"), member_gather)
                if lam is not None:
                    lam.add(x, y, members, sample.get("boundary"))
                if ref_roll is not None:
                    ref_scores = ref_roll.run(x, y)
                if sums_scores:
                    for k in SCORE_KEYS:
                        sums[k] += scores[k]
                        if ref_roll is not None:
                            ref_sums[k] += ref_scores[k]
        if writer is not None:
            writer.close()
    except BaseException as err:
        error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        if writer is not None:
            writer.abort()
        if isinstance(err, torch.cuda.OutOfMemoryError):
            from squall.profiler import out_of_memory_error

            snapshot = ckpt.parent / "forecast" / f"oom-memory-snapshot-rank{rank}.pickle"
            raise out_of_memory_error(err, device, snapshot, "the rollout", advice=(
                "; parallel.chunks=4 runs the mappers in pieces, parallel.model_parallel=N splits "
                "the graph over N GPUs")) from None  # fmt: skip
        raise
    finally:
        try:
            if output is not None:
                written = writer.written if writer is not None else 0
                if world > 1 and error is None:  # every writer's count (no collective after an
                    counts = torch.tensor([float(written)], device=device)  # error: peers hang)
                    dist.all_reduce(counts)
                    written = int(counts.item())
                if (rank == 0 and error is None) or writer is not None:
                    finish_store(output, written, len(starts) * steps * members, error)
        finally:
            stop.__exit__()
    step_s = clock.intervals(pairs)
    total_s = time.perf_counter() - began
    keys = [(sums, k) for k in SCORE_KEYS] + [(ref_sums, k) for k in SCORE_KEYS]
    stacked = torch.stack([d[k] for d, k in keys])
    if world > 1:  # on the device: NCCL reduces device tensors only
        dist.all_reduce(stacked)
    means = stacked.cpu().numpy() / len(starts)  # [score, steps, P]
    mean = {k: means[i] for i, k in enumerate(SCORE_KEYS)}
    ref_mean = {k: means[len(SCORE_KEYS) + i] for i, k in enumerate(SCORE_KEYS)}
    mse_model, mse_persist = mean["mse"], mean["mse_persistence"]
    # The mean over variables of the per-variable MSE is area_weighted_mse over all of them.
    total_model, total_persist = mse_model.mean(axis=1), mse_persist.mean(axis=1)
    physical = np.sqrt(mse_model) * scale  # normalised error x the variable's scale
    memory = peak_memory()
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
        "members": members,
        # CRPS and variance are means over the variables like the MSE (normalised units)
        "crps_model": mean["crps"].mean(axis=1).tolist(),
        "crps_persistence": mean["crps_persistence"].mean(axis=1).tolist(),
        "units": UNITS,
        "step_s_median": float(np.median(step_s)),
        "rollout_s_median": float(np.median(step_s)) * steps,
        "total_s": total_s,
        "write_wait_s": writer.wait_s if writer is not None else 0.0,
        "precision": "bf16" if dtype is not None else "fp32",
        "cuda_graph": step.graph is not None,
        "ranks": world,
        "model_parallel": groups.layout.model_parallel,
        "memory": memory,
    }
    if members > 1:
        spread = np.sqrt(mean["var"].mean(axis=1))
        result["spread"] = spread.tolist()
        result["spread_skill"] = (np.sqrt((members + 1) / members) * spread
                                  / np.sqrt(total_model)).tolist()  # fmt: skip
    if lam is not None:
        result.update(lam.result(len(starts), world, sums["mse"]))
    if reference is not None:
        ref_mse, ref_crps = ref_mean["mse"].mean(axis=1), ref_mean["crps"].mean(axis=1)
        result["reference"] = str(reference[1].path)
        result["rmse_reference"] = np.sqrt(ref_mse).tolist()
        result["crps_reference"] = ref_crps.tolist()
        result["crps_gain"] = (1 - mean["crps"].mean(axis=1) / ref_crps).tolist()
    if output is not None:
        result["output"] = str(output)
    if world > 1:
        per_rank_memory = [None] * world
        dist.all_gather_object(per_rank_memory, memory)
        result["memory_by_rank"] = per_rank_memory
    if rank != 0:
        return result
    result["csv"] = str(write_scores(result, ckpt.parent / "forecast"
                                     / f"scores-step{info.step}-{f.split}.csv"))  # fmt: skip
    record(cfg, result, info)
    return result


def load_reference(path: Path, cfg, parts, device: torch.device):
    """The model of checkpoint ``path`` (a deterministic baseline trained on the same graph and
    data) built on ``parts``' graph and variables, in eval mode, with its description.

    Its architecture comes from the checkpoint's identity; the attention backend from
    ``cfg.model``.
    """
    if not path.exists():
        raise ConfigError(f"forecast.reference {path} not found: train the deterministic model "
                          "first (python -m jobs.train with the same graph and data)")  # fmt: skip
    info, payload = read_checkpoint(path)
    ours = expected_identity(cfg)["graph"]
    identity = info.identity or {}
    if identity.get("graph", {}).get("spec_hash") != ours["spec_hash"]:
        raise CheckpointMismatch(f"forecast.reference {path} was not trained on graph "
                                 f"{ours['name']} (spec {ours['spec_hash']}): give one trained "
                                 "on this graph")  # fmt: skip
    if "model" not in identity:
        raise CheckpointMismatch(f"forecast.reference {path} does not record its model "
                                 "(written by an older squall)")  # fmt: skip
    mcfg = ModelConfig(**identity["model"], attention_backend=str(cfg.model.attention_backend))
    layout = parts.layout
    torch.manual_seed(0)  # the weights are loaded; only the draw order of the build needs a seed
    model = GraphForecaster(parts.graph, mcfg, len(layout.inputs), len(layout.outputs),
                            parts.train_set.input_steps, layout.residual)  # fmt: skip
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointMismatch(f"forecast.reference {path} does not fit its recorded model "
                                 f"({str(err).splitlines()[0]})") from None  # fmt: skip
    return model.to(device).eval(), info


def _step_hours(data) -> float:
    return float(data.info.frequency / np.timedelta64(1, "h")) * data.stride


#: Per-lead-time scores of an ensemble or a reference, after the RMSE columns when present.
PROBABILISTIC_COLUMNS = ("crps_model", "crps_persistence", "spread", "spread_skill",
                         "rmse_reference", "crps_reference", "crps_gain")  # fmt: skip


def write_scores(result: dict, path: Path) -> Path:
    """One row per lead time: normalised RMSE of model and persistence, skill, and each
    variable's RMSE in its own units (column ``rmse_<variable>``), then the CRPS, spread and
    reference columns the result holds (:data:`PROBABILISTIC_COLUMNS`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result["rmse_by_variable"])
    extra = [c for c in PROBABILISTIC_COLUMNS if c in result]
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["lead_hours", "rmse_model", "rmse_persistence", "skill",
                         *(f"rmse_{v}" for v in names), *extra])  # fmt: skip
        for s, hours in enumerate(result["lead_hours"]):
            writer.writerow([hours, result["rmse_model"][s], result["rmse_persistence"][s],
                             result["skill"][s],
                             *(result["rmse_by_variable"][v][s] for v in names),
                             *(result[c][s] for c in extra)])  # fmt: skip
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
    mp = int(result.get("model_parallel", 1))
    name = run_name("forecast", str(cfg.graph.name), str(cfg.model.name),
                    layout_name(mp, int(result.get("ranks", 1)) // mp))  # fmt: skip
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
            metrics.update({name: result[key][s] for key, name in PROBABILISTIC_METRICS.items()
                            if key in result})  # fmt: skip
            logger.log_metrics(metrics, step=int(round(hours)))
        logger.log_metrics(performance_metrics(result), step=0)
        logger.log_artifact(result["csv"], "forecast")
        result["mlflow_run_id"], result["tracking_uri"] = logger.run_id, logger.tracking_uri


#: Result keys of the probabilistic scores and their metric names.
PROBABILISTIC_METRICS = {
    "crps_model": M.FORECAST_CRPS_NORM, "crps_persistence": M.FORECAST_CRPS_PERSISTENCE_NORM,
    "spread": M.FORECAST_SPREAD_NORM, "spread_skill": M.FORECAST_SPREAD_SKILL,
    "rmse_reference": M.FORECAST_RMSE_REFERENCE_NORM,
    "crps_reference": M.FORECAST_CRPS_REFERENCE_NORM, "crps_gain": M.FORECAST_CRPS_GAIN,
}  # fmt: skip


def performance_metrics(result: dict) -> dict[str, float]:
    """How fast the rollout ran and what it held, under :mod:`squall.tracking.metrics` names
    (peak memory of every rank when several ran)."""
    out = {M.FORECAST_STEP_S: result["step_s_median"],
           M.FORECAST_ROLLOUT_S: result["rollout_s_median"],
           M.FORECAST_TOTAL_S: result["total_s"],
           M.FORECAST_WRITE_WAIT_S: result["write_wait_s"], **result["memory"]}  # fmt: skip
    for rank, memory in enumerate(result.get("memory_by_rank") or []):
        out.update({M.per_rank(k, rank): v for k, v in memory.items()})
    return out
