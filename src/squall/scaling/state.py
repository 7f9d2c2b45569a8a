"""What a sweep's driver, its points and its report share: ``sweep.json`` (:class:`SweepState`),
the tags of point runs and where their tracking journals live.

A leaf module (no import of the other :mod:`squall.scaling` modules), so that the sweep, the
points and the report each import it and not one another.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "sweep.json"
JOB_TAG = "squall.job_num"
OVERRIDES_TAG = "squall.overrides"
FAILURE_TAG = "squall.failure_reason"
INTERRUPT_TAG = "squall.interrupted"
GPUS_TAG = "point.gpus"
#: Node list of the point's last attempt (``SLURM_JOB_NODELIST``, or the hostname).
NODELIST_TAG = "point.nodelist"
#: Slurm's end state of the point's job (COMPLETED, FAILED, CANCELLED, ...).
SLURM_STATE_TAG = "slurm.state"
#: MLflow's tag value limit is 8000 characters (mlflow.utils.validation, 3.x); reasons are cut
#: well below it.
MAX_REASON = 2000


def one_line(err: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for tags and tables)."""
    text = str(err).strip().splitlines()
    msg = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


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


def journal_dir(sweep_dir: str | Path, job_num: int | str | None = None) -> Path:
    """Root of the tracking journals of a sweep's driver, or of its point ``job_num`` (in the
    point's directory); ``python -m jobs.report --sync SWEEP_DIR`` finds them all."""
    if job_num is None:
        return Path(sweep_dir) / "tracking"
    return Path(sweep_dir) / str(job_num) / "tracking"


def store_dir(cfg) -> Path:
    """Directory of the embedded MLflow store (as for ``jobs/train.py``), made absolute."""
    return (Path(str(cfg.paths.cache)) / "mlflow").resolve()
