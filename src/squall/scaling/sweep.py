"""Bookkeeping of one sweep: its parent MLflow run, one planned run per point, the end report.

A multirun of ``jobs/scale.py`` keeps ``<sweep dir>/sweep.json`` (:class:`SweepState`): the sweep
id, where it is tracked (after any fallback from an unreachable server, so every point logs to
the same store as its parent), the parent run and the run of every point by Hydra job number.

* :class:`SweepCallback` (``hydra.callbacks`` in ``conf/scale.yaml``) starts the sweep before the
  launcher runs and, when the multirun ends, writes and prints the report
  (:func:`squall.scaling.report.report_sweep`) and finishes the parent run.
* The launcher (:mod:`squall.scaling.launcher`) plans each point's run before submitting it
  (status SCHEDULED), so a point that never starts, or dies without a word, still has a run that
  says why (:func:`record_failure`).
* The point's job attaches to its planned run (:func:`point_logger`) and continues the same run
  when it is requeued.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from squall.errors import SquallError
from squall.scaling.report import report_sweep
from squall.scaling.state import (  # noqa: F401 - re-exported: the sweep's names in one place
    FAILURE_TAG,
    GPUS_TAG,
    INTERRUPT_TAG,
    JOB_TAG,
    MAX_REASON,
    NODELIST_TAG,
    OVERRIDES_TAG,
    SLURM_STATE_TAG,
    STATE_FILE,
    SweepState,
    journal_dir,
    store_dir,
)
from squall.tracking import (
    MlflowLogger,
    NullLogger,
    RunLogger,
    TrackingError,
    record_run_end,
    record_run_failure,
    start_sweep_parent,
    sync_tree,
)
from squall.tracking.logger import KIND_TAG, resolve_tracking_uri

log = logging.getLogger(__name__)

def _sweep_uid() -> str:
    """Six random hex digits: the suffix that keeps sweep directories started in the same second
    apart (``hydra.sweep.dir`` in ``conf/scale.yaml``)."""
    return secrets.token_hex(3)


# Cached like ${now:}: Hydra copies the resolver cache into every point's config, so the points
# see the sweep directory their driver created.
if not OmegaConf.has_resolver("sweep_uid"):
    OmegaConf.register_new_resolver("sweep_uid", _sweep_uid, use_cache=True)


class SweepDirExists(SquallError):
    """The sweep directory exists already: sweeps never share one."""


def _job_config(config: DictConfig) -> DictConfig:
    """The sweep's config without the ``hydra`` node."""
    plain = OmegaConf.to_container(config, resolve=False)
    plain.pop("hydra", None)
    return OmegaConf.create(plain)


def ensure_sweep(config: DictConfig) -> SweepState:
    """The sweep's state, started by :class:`SweepCallback`, or started here if it was not."""
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    if (sweep_dir / STATE_FILE).exists():
        return SweepState.load(sweep_dir)
    return start_sweep(config)


def claim_sweep_dir(config: DictConfig) -> Path:
    """Create the sweep directory, atomically: two sweeps never write into one.

    Raises
    ------
    SweepDirExists
        If it exists (a ``hydra.sweep.dir`` given twice, or another sweep's).
    """
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        sweep_dir.mkdir()
    except FileExistsError:
        raise SweepDirExists(
            f"sweep directory {sweep_dir} exists already (another sweep's, or an earlier run "
            f"into the same hydra.sweep.dir): give a new hydra.sweep.dir or keep the default, "
            f"which is unique") from None
    return sweep_dir


def start_sweep(config: DictConfig) -> SweepState:
    """Start a sweep in its (new) directory: its parent run and ``sweep.json``.

    Parameters
    ----------
    config : DictConfig
        The multirun config (with its ``hydra`` node).
    """
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    name = str(config.hydra.job.name)
    # The directory name (timestamp and random suffix) is unique: claim_sweep_dir made it.
    sweep_id = f"{name}-{sweep_dir.name}"
    tracking = config.tracking
    choices = config.hydra.runtime.choices
    title = (f"{choices.get('experiment') or name} on {config.cluster.name}: "
             f"{config.graph.name} / {config.model.name}")
    if not tracking.get("enabled", True):
        state = SweepState(sweep_id, str(sweep_dir), None, str(tracking.experiment), title=title)
        state.save()
        return state
    parent = start_sweep_parent(sweep_id, uri=tracking.get("uri"),
                                experiment=str(tracking.experiment), store_dir=store_dir(config),
                                run_name=f"sweep {choices.get('experiment') or name} "
                                         f"on {config.cluster.name} ({sweep_dir.name})",
                                journal_dir=journal_dir(sweep_dir))
    # Unresolved: ${hydra:...} has no value outside a job; each point logs its resolved config.
    template = _job_config(config)
    parent.log_params(OmegaConf.to_container(template, resolve=False))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "sweep_config.yaml")
        path.write_text(OmegaConf.to_yaml(template, resolve=False))
        parent.log_artifact(path)
    overrides = list(config.hydra.overrides.task)
    parent.set_tags({"squall.cluster": config.cluster.name,
                     "squall.experiment": choices.get("experiment") or "none",
                     OVERRIDES_TAG: " ".join(overrides) or "(none)",
                     "squall.sweep_dir": str(sweep_dir)})
    parent.close()  # sent now, or left in the sweep's journal for the end of the sweep
    if parent.fallback_from is not None:
        print(f"tracking server {parent.fallback_from} unreachable: this sweep is recorded in "
              f"{parent.tracking_uri}")
    state = SweepState(sweep_id, str(sweep_dir), parent.tracking_uri, str(tracking.experiment),
                       parent.experiment_id, parent.run_id, parent.fallback_from, title=title)
    state.save()
    return state


def plan_point_run(state: SweepState, job_num: int, overrides: list[str], name: str,
                   gpus: int | None = None) -> str | None:
    """Create the point's run (status SCHEDULED) under the sweep's parent; return its id.

    ``gpus`` (the point's ``parallel.gpus``) is tagged so that a point that never ran still has
    its place in the report.
    """
    if state.tracking_uri is None:
        return None
    try:
        run = MlflowLogger(uri=state.tracking_uri, experiment=state.experiment, run_name=name,
                           sweep_id=state.sweep_id, parent_run_id=state.parent_run_id,
                           log_environment=False, when_unreachable="error",
                           journal_dir=journal_dir(state.sweep_dir),
                           tags={KIND_TAG: "point", JOB_TAG: job_num,
                                 OVERRIDES_TAG: " ".join(overrides) or "(none)",
                                 **({GPUS_TAG: gpus} if gpus is not None else {})})
    except TrackingError as err:  # the point creates its run itself when the store answers
        log.warning("point #%d: no run planned ahead: %s", job_num, err)
        return None
    run.set_status("SCHEDULED")
    run.close()
    state.points[str(job_num)] = run.run_id
    state.save()
    return run.run_id


def record_failure(state: SweepState, run_id: str | None, reason: str) -> None:
    """Mark a point's run FAILED with ``reason``, unless the point recorded its own already."""
    if state.tracking_uri is None or run_id is None:
        return
    # A store that does not answer gets it later (journal in the sweep directory): never raises.
    record_run_failure(state.tracking_uri, state.experiment, run_id, reason[:MAX_REASON],
                       journal_dir(state.sweep_dir), tag=FAILURE_TAG)


def record_end(state: SweepState, run_id: str | None, status: str, reason: str = "",
               tags: dict[str, str] | None = None) -> None:
    """Write a point's final truth on its run, as the driver learnt it from Slurm.

    ``status`` FINISHED clears the failure and interruption tags an earlier attempt left;
    KILLED (cancelled) and FAILED set ``reason`` (as :data:`INTERRUPT_TAG` or
    :data:`FAILURE_TAG`) unless the point wrote its own. ``tags`` (Slurm's state, attempts) are
    set in any case. Tracking errors are logged, never raised: the sweep goes on.
    """
    if state.tracking_uri is None or run_id is None:
        return
    # A store that does not answer gets it later (journal in the sweep directory): never raises.
    finished = status == "FINISHED"
    record_run_end(state.tracking_uri, state.experiment, run_id, status,
                   journal_dir(state.sweep_dir), reason=reason[:MAX_REASON],
                   reason_tag=None if finished else
                   INTERRUPT_TAG if status == "KILLED" else FAILURE_TAG,
                   tags={k: str(v)[:MAX_REASON] for k, v in (tags or {}).items()},
                   clear=(FAILURE_TAG, INTERRUPT_TAG) if finished else ())


def abort_sweep(state: SweepState, why: str) -> None:
    """Mark the sweep's parent run KILLED (the sweep stopped before its report)."""
    if state.tracking_uri is None or state.parent_run_id is None:
        return
    record_run_end(state.tracking_uri, state.experiment, state.parent_run_id, "KILLED",
                   journal_dir(state.sweep_dir), reason=why[:MAX_REASON],
                   reason_tag=INTERRUPT_TAG)


def point_logger(cfg, job_num: int | None, sweep_dir: str | None, run_name: str) -> RunLogger:
    """Rank 0's logger for one point: its planned run in a sweep, else a run of its own."""
    tracking = cfg.tracking
    if not tracking.get("enabled", True):
        return NullLogger()
    if sweep_dir is not None and (Path(sweep_dir) / STATE_FILE).exists():
        state = SweepState.load(sweep_dir)
        run_id = state.points.get(str(job_num))
        if state.tracking_uri is not None:
            # The sweep's store, even while it does not answer: the journal keeps the run.
            return MlflowLogger(uri=state.tracking_uri, experiment=state.experiment,
                                store_dir=store_dir(cfg),
                                # a planned run keeps the driver's name (#<n> <layout> ...)
                                run_name=None if run_id else run_name,
                                sweep_id=state.sweep_id, parent_run_id=state.parent_run_id,
                                run_id=run_id, log_environment=False,
                                when_unreachable="journal",
                                journal_dir=journal_dir(sweep_dir, job_num),
                                tags={KIND_TAG: "point", JOB_TAG: job_num})
    # A point outside a sweep (e.g. jobs/slurm/scale.sbatch, requeued): the run named in its run
    # directory continues while the checkpoint it resumes from is there.
    run_dir = Path(str(cfg.training.run_dir))
    record = run_dir / POINT_RUN_RECORD
    run_id = None
    if (run_dir / "checkpoint.pt").exists() and bool(cfg.training.get("resume", True)):
        try:
            run_id = json.loads(record.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            run_id = None
    uri = resolve_tracking_uri(tracking.get("uri"), store_dir(cfg))
    logger = MlflowLogger(uri=uri, experiment=str(tracking.experiment), store_dir=store_dir(cfg),
                          run_name=run_name, log_environment=False, run_id=run_id,
                          tags={KIND_TAG: "point"})  # fmt: skip
    if getattr(logger, "run_id", None) is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{POINT_RUN_RECORD}.{os.getpid()}"
        tmp.write_text(json.dumps({"run_id": logger.run_id}))
        os.replace(tmp, record)
    return logger


#: File in a stand-alone point's ``training.run_dir`` naming its MLflow run (JSON ``run_id``).
POINT_RUN_RECORD = "mlflow_point_run.json"


#: Config groups whose values decide the graph and dataset every point shares.
_INPUT_KEYS = ("graph", "data", "paths")


def prepare_inputs(config: DictConfig) -> None:
    """On the local cluster, build the graph and generate the dataset in the driver before the
    points start, so that their progress shows on the user's terminal (a point would do it in
    its own log, leaving the driver silent); skipped when a sweep varies them. A failure here is
    only a warning: each point prepares its inputs itself and records why it cannot."""
    if str(config.cluster.get("name")) != "local":
        return
    params = dict(config.hydra.sweeper.get("params") or {})
    swept = list(params) + [o.split("=", 1)[0] for o in config.hydra.overrides.task
                            if "," in o.split("=", 1)[-1]]  # fmt: skip
    if any(k.lstrip("+~").split(".")[0].split("@")[0] in _INPUT_KEYS for k in swept):
        return
    from squall.scaling.inputs import build_inputs  # torch, zarr: only when preparing here

    try:
        build_inputs(config)
    except Exception as err:  # noqa: BLE001 - the points report it with their own reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"warning: graph and dataset not prepared before the points ({first})",
              file=sys.stderr)  # fmt: skip


class SweepCallback(Callback):
    """Starts a sweep before its points launch and reports on it when the multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        try:
            claim_sweep_dir(config)
        except SweepDirExists as err:  # Hydra would print a traceback
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self.state = start_sweep(config)
        where = self.state.tracking_uri or "nowhere (tracking.enabled=false)"
        print(f"sweep {self.state.sweep_id}: points in {self.state.sweep_dir}, runs in {where}")
        prepare_inputs(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        from mlflow.exceptions import MlflowException

        state = SweepState.load(Path(str(config.hydra.sweep.dir)).resolve())
        # Whatever the points or the driver could not send during an outage.
        left = [r for r in sync_tree(state.sweep_dir) if r.left]
        if left:
            print(f"warning: {sum(r.left for r in left)} tracking record(s) of "
                  f"{len(left)} run(s) not sent yet ({left[0].error}); "
                  f"`python -m jobs.report --sync {state.sweep_dir}` sends them", file=sys.stderr)
        try:
            report_sweep(state, print_table=True)
        except SquallError as err:  # Hydra would turn it into a warning with a traceback
            print(f"error: no scaling report: {err}", file=sys.stderr)
        except MlflowException as err:  # tracking store down: the points' runs are safe
            print(f"error: no scaling report: tracking store {state.tracking_uri}: "
                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; once it "
                  f"answers: `python -m jobs.report --sync {state.sweep_dir}` then "
                  f"`python -m jobs.report {state.sweep_dir}`", file=sys.stderr)
