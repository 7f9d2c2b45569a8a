"""Run logging behind a small interface: MLflow, or nothing.

Where runs go (:func:`resolve_tracking_uri`): the ``uri`` given (config ``tracking.uri``), else
``MLFLOW_TRACKING_URI``, else an embedded sqlite store ``<store_dir>/mlruns/mlflow.db`` with its
artifacts beside it in ``<store_dir>/mlruns/artifacts``. No server is needed.

An ``http(s)`` server is probed first (``/health``, :data:`PROBE_TIMEOUT_S`); when it does not
answer, one warning line says so and where the run is logged instead (the embedded store), and
the run goes on.

A sweep groups its runs two ways: every run carries the tag ``sweep_id``, and a parent run
(:func:`start_sweep_parent`, created before the points are launched) becomes each point's
``mlflow.parentRunId``, so MLflow's UI nests them and its compare view works on the group.
"""

from __future__ import annotations

import abc
import fcntl
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from squall.errors import SquallError

log = logging.getLogger(__name__)

#: Seconds to wait for a tracking server's /health before falling back to the local store; a
#: server on the same network answers in milliseconds, and a job must never stall for minutes.
PROBE_TIMEOUT_S = 3.0
#: MLflow's limits (mlflow.utils.validation in 3.x): param value length and entries per request.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"
STATUSES = ("FINISHED", "FAILED", "KILLED")
SWEEP_TAG = "sweep_id"
KIND_TAG = "run_kind"

_warned: set[str] = set()


class TrackingError(SquallError):
    """The tracking store cannot be used as configured."""


class RunLogger(abc.ABC):
    """What the training loop and jobs log to. Use as a context manager to finish the run.

    Attributes
    ----------
    run_id : str or None
        Run identifier in the store; None when nothing is recorded.
    tracking_uri : str or None
        Where the run is recorded.
    """

    run_id: str | None = None
    tracking_uri: str | None = None

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters (nested mappings are flattened with dots, long values truncated)."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metric values at training step ``step``."""

    @abc.abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a directory into the run's artifacts (under ``artifact_path``)."""

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values become strings."""

    @abc.abstractmethod
    def finish(self, status: str = "FINISHED") -> None:
        """End the run as ``FINISHED``, ``FAILED`` or ``KILLED``; later calls do nothing."""

    def log_config(self, cfg: Any) -> None:
        """Record a (possibly OmegaConf) config as flattened params and as ``config.yaml``."""
        self.log_params(flatten_config(cfg))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "config.yaml")
            path.write_text(_to_yaml(cfg))
            self.log_artifact(path)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


class NullLogger(RunLogger):
    """Records nothing: for tests, non-zero ranks and ``tracking.enabled=false``."""

    def log_params(self, params: Mapping[str, Any]) -> None:  # noqa: D102
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:  # noqa: D102
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:  # noqa: D102
        pass

    def finish(self, status: str = "FINISHED") -> None:  # noqa: D102
        pass


def flatten_config(cfg: Any, max_len: int = MAX_PARAM_VALUE_LENGTH) -> dict[str, str]:
    """Flatten a nested config into ``{"a.b.c": "value"}`` for MLflow params.

    Parameters
    ----------
    cfg : mapping or OmegaConf container
        Interpolations are resolved; missing values (``???``) stay as they are.
    max_len : int
        Longer values are cut to this length, ending in ``...[truncated]``.

    Returns
    -------
    dict
        Lists of scalars become one JSON value (``[1, 2]``); lists holding mappings are indexed
        (``layers.0.width``); empty mappings read ``{}``.
    """
    out: dict[str, str] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            if not value and key:
                out[key] = "{}"
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping | list | tuple)
                                                    for v in value):
            for i, v in enumerate(value):
                visit(v, f"{key}.{i}")
        else:
            text = json.dumps(list(value)) if isinstance(value, list | tuple) else str(value)
            if len(text) > max_len:
                text = text[: max_len - len(TRUNCATED)] + TRUNCATED
            out[key] = text

    visit(_plain(cfg), "")
    return out


def _plain(cfg: Any) -> Any:
    """OmegaConf containers to plain dicts and lists; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return cfg
    if isinstance(cfg, DictConfig | ListConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def _to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(_plain(cfg)), resolve=True)


def local_store_uri(store_dir: str | Path) -> str:
    """URI of the embedded sqlite store under ``store_dir``."""
    return "sqlite:///" + str(Path(store_dir).resolve() / "mlruns" / "mlflow.db")


def resolve_tracking_uri(uri: str | None, store_dir: str | Path) -> str:
    """Where runs go: ``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(store_dir)


def probe_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an ``http(s)`` tracking server cannot be used, or None when it answers ``/health``.

    Other schemes (sqlite, databases, databricks) are not probed and give None.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            if reply.status != 200:
                return f"/health answered HTTP {reply.status}"
    except urllib.error.HTTPError as err:
        return f"/health answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return str(reason) or type(reason).__name__
    return None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creation of an sqlite store: parallel first use breaks its schema set-up."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store (sqlite schema) and the experiment if needed; return the experiment id.

    Call it once before launching parallel jobs into a fresh sqlite store. An sqlite store gets
    an explicit artifact location beside the database (``artifacts/``).

    Raises
    ------
    TrackingError
        If the store cannot be opened or the experiment is deleted.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    try:
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    return client.create_experiment(experiment, artifact_location=artifacts)
                except MlflowException:  # created meanwhile by another process
                    found = client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
    except MlflowException as err:
        raise TrackingError(f"tracking store {uri}: {err.message.splitlines()[0]}") from err
    if found.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {experiment!r} in {uri} is deleted: restore it or choose another name"
        )
    return found.experiment_id


def _bounded_http_retries() -> None:
    """Keep MLflow's HTTP retries short: by default they back off for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class MlflowLogger(RunLogger):
    """A run in an MLflow tracking store.

    Parameters
    ----------
    uri : str, optional
        Tracking URI; see :func:`resolve_tracking_uri`.
    experiment : str
        Experiment name, created if missing.
    store_dir : str or Path
        Directory of the embedded store (default and fallback).
    run_name : str, optional
        Name shown in the UI.
    tags : mapping, optional
        Extra tags set at creation.
    sweep_id : str, optional
        Tag grouping the runs of one sweep; the sweep's parent run, if one exists, becomes this
        run's parent unless ``parent_run_id`` is given.
    parent_run_id : str, optional
        Nest this run under that one.
    log_environment : bool
        Tag the run with :func:`squall.tracking.environment.collect_environment` (``env.*``).
    run_id : str, optional
        Continue this existing run (created ahead by a sweep's launcher, or before a requeue)
        instead of creating one: it is set back to RUNNING and ``tags`` are added to it.

    Attributes
    ----------
    fallback_from : str or None
        The unreachable server this run was meant for, when it fell back to the local store.
    """

    def __init__(self, uri: str | None = None, experiment: str = "squall",
                 store_dir: str | Path = ".", run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None, sweep_id: str | None = None,
                 parent_run_id: str | None = None, log_environment: bool = True,
                 run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        target = resolve_tracking_uri(uri, store_dir)
        self.fallback_from: str | None = None
        if target.startswith(("http://", "https://")):
            _bounded_http_retries()
            reason = probe_server(target)
            if reason is not None:
                self.fallback_from = target
                target = local_store_uri(store_dir)
                if self.fallback_from not in _warned:
                    _warned.add(self.fallback_from)
                    log.warning("tracking server %s unreachable (%s); logging to %s instead",
                                self.fallback_from, reason, target)
        self.tracking_uri = target
        self.experiment_id = prepare_store(target, experiment)
        self._client = MlflowClient(tracking_uri=target)
        self._finished = False

        all_tags: dict[str, str] = {}
        if log_environment:
            from squall.tracking.environment import collect_environment

            env = collect_environment()
            all_tags.update({f"env.{k}": v for k, v in env.items()})
            if env["git_sha"] != "unknown":
                all_tags["mlflow.source.git.commit"] = env["git_sha"]
        if sweep_id is not None:
            all_tags[SWEEP_TAG] = str(sweep_id)
            if parent_run_id is None:
                parent_run_id = find_sweep_parent(target, self.experiment_id, str(sweep_id))
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if self.fallback_from is not None:
            all_tags["squall.tracking_fallback_from"] = self.fallback_from
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        if run_id is not None and self.fallback_from is not None:
            # The planned run lives on the unreachable server: record here, and say which it was.
            all_tags["squall.planned_run_id"] = run_id
        elif run_id is not None:
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING", name=run_name)
            self.set_tags(all_tags)
            return
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:  # noqa: D102
        from mlflow.entities import Param

        flat = flatten_config(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:  # noqa: D102
        import time

        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(k, float(v), now_ms, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # noqa: D102
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact {path} does not exist")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:  # noqa: D102
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i:i + MAX_PARAMS_PER_BATCH])

    def finish(self, status: str = "FINISHED") -> None:  # noqa: D102
        if status not in STATUSES:
            raise ValueError(f"status {status!r} not one of {STATUSES}")
        if not self._finished:
            self._client.set_terminated(self.run_id, status)
            self._finished = True


def find_sweep_parent(uri: str, experiment_id: str, sweep_id: str) -> str | None:
    """Run id of the parent run of sweep ``sweep_id``, or None if there is none."""
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=uri).search_runs(
        [experiment_id],
        filter_string=f"tags.{SWEEP_TAG} = '{sweep_id}' and tags.{KIND_TAG} = 'sweep'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_sweep_parent(sweep_id: str, uri: str | None = None, experiment: str = "squall",
                       store_dir: str | Path = ".", run_name: str | None = None) -> MlflowLogger:
    """Create the parent run of a sweep; start it before launching the sweep's points.

    Points created afterwards with the same ``sweep_id`` nest under it. Creating it also
    prepares a fresh sqlite store, so parallel points do not race to create it.
    """
    return MlflowLogger(uri=uri, experiment=experiment, store_dir=store_dir,
                        run_name=run_name or f"sweep {sweep_id}",
                        tags={SWEEP_TAG: sweep_id, KIND_TAG: "sweep"}, parent_run_id=None,
                        log_environment=True)


def create_logger(tracking: Mapping[str, Any] | None = None, store_dir: str | Path = ".",
                  rank: int = 0, **kwargs: Any) -> RunLogger:
    """The logger a job should use, from the ``tracking`` config group.

    Parameters
    ----------
    tracking : mapping, optional
        ``enabled`` (default True), ``uri`` (default None), ``experiment`` (default "squall").
    store_dir : str or Path
        Directory of the embedded store.
    rank : int
        Global rank; only rank 0 records (others get a :class:`NullLogger`).
    **kwargs
        Passed to :class:`MlflowLogger` (``run_name``, ``tags``, ``sweep_id``, ...).
    """
    tracking = dict(tracking or {})
    if rank != 0 or not tracking.get("enabled", True):
        return NullLogger()
    return MlflowLogger(uri=tracking.get("uri"), experiment=tracking.get("experiment", "squall"),
                        store_dir=store_dir, **kwargs)
