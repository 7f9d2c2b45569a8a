"""From a resolved config to a finished run: device -> graph -> data -> model -> training loop.

Used by ``jobs/train.py`` (and by the scaling job for one point).

One training, one MLflow run: the run id is kept in each checkpoint and in
``training.run_dir/mlflow_run.json`` (:data:`RUN_RECORD`), so a job that resumes from the
checkpoint, or restarts after a stop during start-up, continues the same run
(:func:`open_tracking_run`); its metrics go on at the checkpoint's step. Each attempt ends with
:func:`end_attempt`, which sets the run's status and end tags (:data:`END_REASON_TAG`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from squall.data.sampler import ResumableSampler
from squall.data.setup import build_dataset, ensure_dataset, variable_roles
from squall.data.zarr_dataset import make_dataloader
from squall.errors import ConfigError, DataError
from squall.graphs import Graph, load_or_build
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.models.obs_encoder import attach_observations
from squall.parallel.parallelize import (
    ParallelConfig,
    ParallelSetup,
    apply_parallelism,
    prepare_parallel,
    reduce_loss,
)  # fmt: skip
from squall.planning.estimate import describe_checkpointing, estimate
from squall.tracking import metrics as M
from squall.train.boundary import BoundaryForcing
from squall.train.checkpoint import checkpoint_extra
from squall.train.loop import Trainer, TrainerHooks, VariableLayout

log = logging.getLogger(__name__)

#: File in ``training.run_dir`` naming the MLflow run of the training there (JSON: ``run_id``,
#: ``tracking_uri``, ``params`` as logged, ``attempts``, ``status``, ``step``).
RUN_RECORD = "mlflow_run.json"
#: Why the last attempt ended: ``finished at step N``, ``stopped by SIGTERM at step N ...``,
#: ``stopped by SIGTERM during start-up``, ``failed: ...``; ``running`` while it runs.
END_REASON_TAG = "squall.end_reason"
#: The signal that stopped the last attempt, or ``none``.
STOP_SIGNAL_TAG = "squall.stop_signal"
#: ``true`` when running the job again with the same ``training.run_dir`` continues this run.
RESUMABLE_TAG = "squall.resumable"
#: Number of jobs (attempts) that have trained in this run.
ATTEMPTS_TAG = "squall.attempts"
#: On a new run: the run it should have continued (in another store, or no longer there).
CONTINUES_TAG = "squall.continues_run"
#: Prefix of tags holding config values that changed on a continuation (MLflow params are
#: immutable: the run keeps the first attempt's value as the param).
RESUMED_WITH_TAG = "squall.resumed_with."


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
    hooks: TrainerHooks | None = None,
) -> RunParts:
    """Build graph, datasets, model and trainer from ``cfg`` (nothing trained yet).

    With ``distribute`` (after ``init_distributed``, or in one process), ``cfg.parallel`` decides
    the layout:
    with ``model_parallel > 1`` (or mapper ``chunks > 1``) the model is sharded in place by
    :func:`squall.parallel.parallelize.parallelize` and each rank reads its own grid rows; the
    remaining ranks are data-parallel replicas (DDP when there is no model parallelism).
    ``training=False`` (forecasts) skips planning checkpointing for ``checkpoint.budget_gib``:
    nothing is kept for a backward. ``hooks`` go to the :class:`Trainer` (a scaling point's).
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
    spread_set = (train_set if rows is None
                  else build_dataset(cfg, "train", rollout=rollout, check=False))  # fmt: skip
    mcfg = ModelConfig.from_cfg(cfg.model)
    if mcfg.checkpoint_budget_gib is not None and training:
        # members are batch rows; an ensemble group's ranks hold members / ensemble each
        ensemble = setup.config.ensemble if setup is not None else 1
        batch_rows = int(t.batch_size) * max(1, mcfg.ensemble_members // ensemble)
        mcfg = resolve_checkpointing(graph, mcfg, setup, batch_rows, layout,
                                     train_set.input_steps, device, str(t.precision), rollout)  # fmt: skip
    torch.manual_seed(int(t.seed))  # parameters identical whatever was drawn before
    # a driven LAM's states carry the driver's next values too (squall.train.boundary)
    forcing = BoundaryForcing.for_dataset(train_set, layout, device)
    extra = forcing.extra_inputs if forcing is not None else 0
    model = attach_observations(GraphForecaster(
        graph, mcfg, len(layout.inputs) + extra, len(layout.outputs),
        train_set.input_steps, layout.residual, tendency_spread(spread_set, layout),
    ), cfg, graph).to(device)  # fmt: skip
    groups = setup.groups if setup is not None else None
    distributed = groups is not None and groups.layout.world_size > 1
    model, wrapped = apply_parallelism(model, graph, setup, device)
    run_dir = Path(str(t.run_dir))
    trainer = Trainer(
        model, layout, t, device, logger, run_dir / "checkpoint.pt", wrapped=wrapped,
        reduce=(lambda x: reduce_loss(x, groups)) if distributed else None,
        is_main=not distributed or dist.get_rank() == 0,
        agree=(lambda signum: _agreed_signal(signum, device)) if distributed else None,
        barrier=dist.barrier if distributed else None,
        replicas=setup.data_parallel_size if setup is not None else 1, hooks=hooks,
    )  # fmt: skip
    trainer.boundary = forcing  # a driven LAM
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


def _agreed_signal(signum: int, device: torch.device) -> int:
    """The stop signal any rank received, 0 for none (one tiny all-reduce)."""
    value = torch.tensor([signum], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def train_loader_factory(parts: RunParts, cfg):
    """``make_loader(samples_seen)`` for :meth:`Trainer.fit`: this data-parallel replica's
    batches of ``training.batch_size`` from :class:`~squall.data.sampler.ResumableSampler`,
    starting after ``samples_seen`` samples.

    Raises
    ------
    DataError
        If an epoch gives this replica no whole batch (a batch would repeat samples).
    """
    t, setup = cfg.training, parts.parallel
    rank, replicas = (0, 1) if setup is None else (setup.data_parallel_rank,
                                                   setup.data_parallel_size)  # fmt: skip
    batch, windows = int(t.batch_size), len(parts.train_set)
    if windows // replicas < batch:
        raise DataError(
            f"{windows} training windows give no batch of {batch} to each of {replicas} "
            "data-parallel rank(s); lower training.batch_size (scale.batch for a scaling point) "
            "or use more data"
        )
    workers = int(cfg.data.get("num_workers", 0))
    pin = parts.trainer.device.type == "cuda"

    def make_loader(samples_seen: int):
        sampler = ResumableSampler(windows, int(t.seed), samples_seen, rank, replicas)
        return make_dataloader(parts.train_set, batch_size=batch, num_workers=workers,
                               sampler=sampler, pin_memory=pin)  # fmt: skip

    return make_loader


def train(cfg, logger) -> dict:
    """Train as configured, resuming from ``run_dir/checkpoint.pt`` when allowed; return a summary."""
    parts = build_run(cfg, logger, distribute=True)
    t, model, trainer = cfg.training, parts.model, parts.trainer
    log.info(
        "model: %s parameters, %.3g GFLOP forward per sample; graph %s; %d training windows",
        f"{model.num_parameters():,}", model.flops_per_sample() / 1e9, parts.graph.name, len(parts.train_set),
    )  # fmt: skip
    make_loader = train_loader_factory(parts, cfg)
    if bool(t.resume):
        trainer.resume()
    val_loader = make_dataloader(parts.val_set, batch_size=int(t.batch_size), num_workers=0)
    summary = trainer.fit(make_loader, val_loader)
    summary.update({M.MODEL_PARAMETERS: float(model.num_parameters()),
                    M.MODEL_GFLOP_PER_SAMPLE: model.flops_per_sample() / 1e9})  # fmt: skip
    return summary


# ----------------------------------------------------------------------------------------------
# One MLflow run across attempts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviousRun:
    """The MLflow run a job continues: what the checkpoint or the run record names."""

    run_id: str
    tracking_uri: str | None
    params: dict | None  # as logged to the run (None: unknown, from a checkpoint alone)
    attempts: int
    step: int


def read_record(run_dir) -> dict:
    """The run record of ``run_dir`` (``{}`` when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(run_dir: Path, logger, **fields) -> None:
    """Merge ``fields`` into the run record of ``logger``'s run (atomic; nothing without a run)."""
    run_id = getattr(logger, "run_id", None)
    if run_id is None:
        return
    record = read_record(run_dir)
    if record.get("run_id") != run_id:
        record = {"run_id": run_id}
    record.update(tracking_uri=getattr(logger, "tracking_uri", None), **fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / RUN_RECORD)


def previous_run(cfg) -> PreviousRun | None:
    """The MLflow run this job continues, or None for a new one.

    With ``training.resume`` it is the run named by ``run_dir/checkpoint.pt``, or, when there is
    no checkpoint, the run of ``run_dir``'s record if that one was stopped before training its
    first step (a stop during start-up). A run that failed or trained without leaving a
    checkpoint is not continued: its steps would be logged twice.
    """
    t = cfg.training
    if not bool(t.resume):
        return None
    run_dir = Path(str(t.run_dir))
    record = read_record(run_dir)
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        extra = checkpoint_extra(ckpt)
        run_id = extra.get("mlflow_run_id")
        if not run_id:
            return None
        same = record.get("run_id") == run_id
        return PreviousRun(run_id, extra.get("tracking_uri"),
                           record.get("params") if same else None,
                           int(record.get("attempts", 1)) if same else 1, int(extra["step"]))  # fmt: skip
    if record.get("run_id") and record.get("status") == "KILLED" and not record.get("step"):
        return PreviousRun(record["run_id"], record.get("tracking_uri"), record.get("params"),
                           int(record.get("attempts", 1)), 0)  # fmt: skip
    return None


def open_tracking_run(cfg, store_dir, rank: int = 0, world_size: int = 1):
    """The tracking run of this job, its config logged: the previous run when one is continued
    (:func:`previous_run`), else a new one. Only rank 0 records (others get a null logger).

    On a continuation the config's params are not logged again (MLflow params cannot change):
    keys new to the run are added, changed values are tagged ``squall.resumed_with.<key>`` and
    the new ``config.yaml`` is stored under ``attempt-<n>/``.

    Returns
    -------
    logger : RunLogger
    attempt : int
        1 for a new run, else the number of jobs that have trained in it, this one included.
    """
    from omegaconf import OmegaConf

    from squall.tracking import create_logger, flatten_config, resolve_tracking_uri
    from squall.tracking.experiment import layout_name, run_name

    tracking = to_plain(cfg.tracking)
    model_parallel = int(cfg.parallel.get("model_parallel", 1))
    ensemble = int(cfg.parallel.get("ensemble", 1))
    name = run_name("train", str(cfg.graph.name), str(cfg.model.name),
                    layout_name(model_parallel, max(1, world_size // (model_parallel * ensemble)),
                                ensemble))  # fmt: skip
    kwargs = {"store_dir": store_dir, "rank": rank, "run_name": name,
              "tags": {"job": "train", "world_size": world_size}}  # fmt: skip
    previous = previous_run(cfg) if rank == 0 and tracking.get("enabled", True) else None
    logger = None
    if previous is not None:
        target = resolve_tracking_uri(tracking.get("uri"), store_dir)
        if previous.tracking_uri not in (None, target):
            reason = f"it is in {previous.tracking_uri}, this job logs to {target}"
        else:
            try:
                # a continued run keeps the name it was given when it started
                logger = create_logger(tracking, run_id=previous.run_id,
                                       **{**kwargs, "run_name": None})  # fmt: skip
                reason = None
            except Exception as err:  # a deleted run, another store: never stop training
                reason = (
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                )
        if logger is None:
            log.warning("cannot continue MLflow run %s (%s): starting a new run", previous.run_id,
                        reason)  # fmt: skip
            kwargs["tags"][CONTINUES_TAG] = previous.run_id
    if logger is None:
        logger = create_logger(tracking, **kwargs)
    run_dir = Path(str(cfg.training.run_dir))
    flat = flatten_config(cfg)
    continued = previous is not None and logger.run_id == previous.run_id
    if continued:
        attempt = previous.attempts + 1
        known = previous.params
        if known is not None:
            new = {k: v for k, v in flat.items() if k not in known}
            changed = sorted(k for k, v in flat.items() if k in known and known[k] != v)
            if new:
                logger.log_params(new)
            if changed:
                log.warning("continuing MLflow run %s with changed settings %s (tagged %s<key>; "
                            "the run's params keep the first values)", logger.run_id,
                            ", ".join(f"{k}={flat[k]}" for k in changed), RESUMED_WITH_TAG)  # fmt: skip
                logger.set_tags({RESUMED_WITH_TAG + k: flat[k] for k in changed})
            flat = {**flat, **known}
        if logger.run_id is not None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp, "config.yaml")
                path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
                logger.log_artifact(path, f"attempt-{attempt}")
        log.info("continuing MLflow run %s (attempt %d)", logger.run_id, attempt)
    else:
        attempt = 1
        logger.log_config(cfg)
    logger.set_tags({ATTEMPTS_TAG: attempt, END_REASON_TAG: "running", STOP_SIGNAL_TAG: "none",
                     RESUMABLE_TAG: "false"})  # fmt: skip
    step = previous.step if continued else 0
    _write_record(run_dir, logger, params=flat, attempts=attempt, status="RUNNING", step=step)
    return logger, attempt


def end_attempt(
    logger,
    cfg,
    status: str,
    reason: str,
    step: int | None = None,
    signal_name: str | None = None,
    resumable: bool = False,
) -> None:
    """End this job's part of the run: status (``FINISHED``, ``FAILED``, ``KILLED``), end tags
    and the run record (``step``: the last step trained; None leaves the recorded one)."""
    try:
        logger.set_tags({END_REASON_TAG: reason, STOP_SIGNAL_TAG: signal_name or "none",
                         RESUMABLE_TAG: str(bool(resumable)).lower()})  # fmt: skip
    finally:  # the status even when the tags could not be written
        logger.finish(status)
    fields = {"status": status} if step is None else {"status": status, "step": int(step)}
    _write_record(Path(str(cfg.training.run_dir)), logger, **fields)


def to_plain(node) -> dict:
    from squall.config import to_container

    return dict(to_container(node) or {})
