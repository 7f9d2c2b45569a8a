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
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from squall.errors import SquallError
from squall.tracking import MlflowLogger, NullLogger, RunLogger, start_sweep_parent
from squall.tracking.logger import KIND_TAG, resolve_tracking_uri

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
JOB_TAG = "squall.job_num"
OVERRIDES_TAG = "squall.overrides"
FAILURE_TAG = "squall.failure_reason"
INTERRUPT_TAG = "squall.interrupted"
GPUS_TAG = "point.gpus"
#: MLflow's tag value limit is 8000 characters (mlflow.utils.validation, 3.x); reasons are cut
#: well below it.
MAX_REASON = 2000


@dataclass
class SweepState:
    """Contents of ``sweep.json``.

    Attributes
    ----------
    sweep_id : str
        Value of the ``sweep_id`` tag on every run of the sweep.
    sweep_dir : str
        Hydra's sweep directory (absolute).
    tracking_uri : str or None
        Store of the sweep's runs; None with ``tracking.enabled=false``.
    experiment, experiment_id : str
        MLflow experiment name and id.
    parent_run_id : str or None
        The sweep's parent run.
    fallback_from : str or None
        The configured server that did not answer, when the sweep fell back to the local store.
    points : dict
        Hydra job number (as a string) to the point's run id.
    title : str
        What was swept where, for the report (experiment, cluster, graph and model).
    """

    sweep_id: str
    sweep_dir: str
    tracking_uri: str | None
    experiment: str
    experiment_id: str | None = None
    parent_run_id: str | None = None
    fallback_from: str | None = None
    points: dict[str, str] = field(default_factory=dict)
    title: str = ""

    def save(self) -> None:
        """Write atomically (points read it while the launcher adds to it)."""
        path = Path(self.sweep_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, sweep_dir: str | Path) -> SweepState:
        """Read ``<sweep_dir>/sweep.json``."""
        return cls(**json.loads((Path(sweep_dir) / STATE_FILE).read_text()))

    def client(self):
        """An MlflowClient on the sweep's store."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)


def store_dir(cfg) -> Path:
    """Directory of the embedded MLflow store (as for ``jobs/train.py``), made absolute."""
    return (Path(str(cfg.paths.cache)) / "mlflow").resolve()


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


def start_sweep(config: DictConfig) -> SweepState:
    """Start a sweep: its parent run and a fresh ``sweep.json`` (replacing one left in the sweep
    directory by an earlier multirun into the same ``hydra.sweep.dir``).

    Parameters
    ----------
    config : DictConfig
        The multirun config (with its ``hydra`` node).
    """
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    name = str(config.hydra.job.name)
    # The directory name is a timestamp; the suffix keeps two sweeps started in one second apart.
    sweep_id = f"{name}-{sweep_dir.name}-{uuid.uuid4().hex[:6]}"
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
                                         f"on {config.cluster.name} ({sweep_dir.name})")
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
    run = MlflowLogger(uri=state.tracking_uri, experiment=state.experiment, run_name=name,
                       sweep_id=state.sweep_id, parent_run_id=state.parent_run_id,
                       log_environment=False,
                       tags={KIND_TAG: "point", JOB_TAG: job_num,
                             OVERRIDES_TAG: " ".join(overrides) or "(none)",
                             **({GPUS_TAG: gpus} if gpus is not None else {})})
    state.client().update_run(run.run_id, status="SCHEDULED")
    state.points[str(job_num)] = run.run_id
    state.save()
    return run.run_id


def record_failure(state: SweepState, run_id: str | None, reason: str) -> None:
    """Mark a point's run FAILED with ``reason``, unless the point recorded its own already."""
    if state.tracking_uri is None or run_id is None:
        return
    client = state.client()
    run = client.get_run(run_id)
    if FAILURE_TAG not in run.data.tags:
        client.set_tag(run_id, FAILURE_TAG, reason[:MAX_REASON])
    if run.info.status in ("RUNNING", "SCHEDULED", "FINISHED"):
        client.set_terminated(run_id, "FAILED")


def point_logger(cfg, job_num: int | None, sweep_dir: str | None, run_name: str) -> RunLogger:
    """Rank 0's logger for one point: its planned run in a sweep, else a run of its own."""
    tracking = cfg.tracking
    if not tracking.get("enabled", True):
        return NullLogger()
    if sweep_dir is not None and (Path(sweep_dir) / STATE_FILE).exists():
        state = SweepState.load(sweep_dir)
        run_id = state.points.get(str(job_num))
        if state.tracking_uri is not None:
            return MlflowLogger(uri=state.tracking_uri, experiment=state.experiment,
                                store_dir=store_dir(cfg), run_name=run_name,
                                sweep_id=state.sweep_id, parent_run_id=state.parent_run_id,
                                run_id=run_id, log_environment=False,
                                tags={KIND_TAG: "point", JOB_TAG: job_num})
    uri = resolve_tracking_uri(tracking.get("uri"), store_dir(cfg))
    return MlflowLogger(uri=uri, experiment=str(tracking.experiment), store_dir=store_dir(cfg),
                        run_name=run_name, log_environment=False, tags={KIND_TAG: "point"})


class SweepCallback(Callback):
    """Starts a sweep before its points launch and reports on it when the multirun ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        self.state = start_sweep(config)
        where = self.state.tracking_uri or "nowhere (tracking.enabled=false)"
        print(f"sweep {self.state.sweep_id}: points in {self.state.sweep_dir}, runs in {where}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        from squall.scaling.report import report_sweep

        state = SweepState.load(Path(str(config.hydra.sweep.dir)).resolve())
        try:
            report_sweep(state, print_table=True)
        except SquallError as err:  # Hydra would turn it into a warning with a traceback
            print(f"error: no scaling report: {err}", file=sys.stderr)
