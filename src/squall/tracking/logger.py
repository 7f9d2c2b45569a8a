"""Run logging behind a small interface: MLflow, or nothing.

Where runs go (:func:`resolve_tracking_uri`): the ``uri`` given (config ``tracking.uri``), else
``MLFLOW_TRACKING_URI``, else an embedded sqlite store ``<store_dir>/mlruns/mlflow.db`` with its
artifacts beside it in ``<store_dir>/mlruns/artifacts``. No server is needed.

An ``http(s)`` server is probed first (``/health``, :data:`PROBE_TIMEOUT_S`); when it does not
answer, one warning line says so and where the run is logged instead (the embedded store), and
the run goes on. A run that exists already (``run_id``: planned by a sweep, or continued after a
requeue) stays on its server and waits for it in its journal (see :class:`MlflowLogger`).

Once the run is opened, nothing is sent from the caller's thread: every call goes to a durable
journal on local disk, sent in order by a background thread (:mod:`squall.tracking.buffer`), so
an outage of the store mid-run costs a warning, never a step, a run or the job.

A sweep groups its runs two ways: every run carries the tag ``sweep_id``, and a parent run
(:func:`start_sweep_parent`, created before the points are launched) becomes each point's
``mlflow.parentRunId``, so MLflow's UI nests them and its compare view works on the group.
"""

from __future__ import annotations

import abc
import contextlib
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
from squall.tracking import buffer
from squall.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, mark_experiment

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
#: What :class:`MlflowLogger` does when its server does not answer at start.
UNREACHABLE = ("fallback", "journal", "error")
#: Seconds ``finish()`` waits for the journal to reach the store before leaving the rest for
#: ``jobs.report --sync``: a restarted server answers within seconds (8 to 11 s for a cold
#: ``mlflow server`` on 2 cores), and a job stopped by Slurm has KillWait (30 s by default)
#: between SIGTERM and SIGKILL, its checkpoint included.
DRAIN_TIMEOUT_S = 20.0
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

    artifacts = _artifact_location(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    return client.create_experiment(experiment, artifact_location=artifacts,
                                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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
    try:  # an experiment created before squall set its kind, or by someone else
        mark_experiment(client, found.experiment_id, found.tags)
    except MlflowException as err:  # the UI's first page is no reason to stop a job
        log.debug("cannot set the kind of experiment %r: %s", experiment, err)
    return found.experiment_id


def _bounded_http_retries() -> None:
    """Keep MLflow's HTTP retries short: by default they back off for minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class MlflowLogger(RunLogger):
    """A run in an MLflow tracking store, written through a durable local journal.

    Every call is appended to the run's journal (:mod:`squall.tracking.buffer`) and returns;
    a background thread sends the journal to the store in order, retrying while the store is
    down, so a tracking outage never stops or kills training. :meth:`finish` waits up to
    ``drain_timeout_s`` for the journal to arrive; what has not arrived by then stays in the
    journal for ``python -m jobs.report --sync DIR`` or the next logger on the same journal root.

    When the server does not answer at start (probe of ``/health``, or creating the run fails):

    * a new run (no ``run_id``) with ``when_unreachable="fallback"`` is created in the embedded
      store instead, with one warning (:attr:`fallback_from` says so);
    * ``when_unreachable="journal"``: everything is journaled; a new run is created on the
      server when it answers (its id, :attr:`run_id`, is None until then, and is kept in the
      journal's ``state.json``); a run given by ``run_id`` is continued there;
    * ``when_unreachable="error"``: :class:`TrackingError`.

    A run given by ``run_id`` is never moved to the embedded store: it is continued on its
    server, through the journal.

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
        instead of creating one: it is set back to RUNNING, loses a failure reason left by an
        earlier attempt, and ``tags`` are added to it. Records an earlier process left in this
        run's journal under ``journal_dir`` are sent first.
    journal_dir : str or Path, optional
        Root of the journals (one directory per run); ``<store_dir>/journal`` by default.
        Unsent journals of earlier runs found there are sent in the background too.
    when_unreachable : {"fallback", "journal", "error"}
        See above.
    drain_timeout_s : float
        How long :meth:`finish` waits for the journal to reach the store.

    Attributes
    ----------
    fallback_from : str or None
        The unreachable server this run was meant for, when it fell back to the local store.
    journal : squall.tracking.buffer.Journal
        The run's journal (a directory under ``journal_dir``).
    """

    def __init__(self, uri: str | None = None, experiment: str = "squall",
                 store_dir: str | Path = ".", run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None, sweep_id: str | None = None,
                 parent_run_id: str | None = None, log_environment: bool = True,
                 run_id: str | None = None, journal_dir: str | Path | None = None,
                 when_unreachable: str = "fallback",
                 drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        if when_unreachable not in UNREACHABLE:
            raise ValueError(f"when_unreachable={when_unreachable!r} not one of {UNREACHABLE}")
        target = resolve_tracking_uri(uri, store_dir)
        self.fallback_from: str | None = None
        self.drain_timeout_s = float(drain_timeout_s)
        self.experiment_id: str | None = None
        self._finished = False
        self._write_failed = False

        all_tags: dict[str, str] = {}
        if log_environment:
            from squall.tracking.environment import collect_environment

            env = collect_environment()
            all_tags.update({f"env.{k}": v for k, v in env.items()})
            if env["git_sha"] != "unknown":
                all_tags["mlflow.source.git.commit"] = env["git_sha"]
        if sweep_id is not None:
            all_tags[SWEEP_TAG] = str(sweep_id)
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})

        reason = None
        if target.startswith(("http://", "https://")):
            _bounded_http_retries()
            reason = probe_server(target)
        created: str | None = None
        if reason is None:
            try:
                self.experiment_id, created = self._open(target, experiment, run_id, run_name,
                                                         all_tags, sweep_id)
            except _Unreachable as err:
                reason = str(err)
        if reason is not None and run_id is None and when_unreachable == "fallback":
            self.fallback_from = target
            target = local_store_uri(store_dir)
            if self.fallback_from not in _warned:
                _warned.add(self.fallback_from)
                log.warning("tracking server %s unreachable (%s); logging to %s instead",
                            self.fallback_from, reason, target)
            all_tags["squall.tracking_fallback_from"] = self.fallback_from
            try:
                self.experiment_id, created = self._open(target, experiment, None, run_name,
                                                         all_tags, sweep_id)
            except _Unreachable as err:
                raise TrackingError(f"tracking store {target}: {err}") from err
            reason = None
        elif reason is not None and when_unreachable == "error":
            raise TrackingError(f"tracking server {target} unreachable ({reason})")
        self.tracking_uri = target

        self._root = Path(journal_dir) if journal_dir is not None else Path(store_dir) / "journal"
        self._experiment = experiment
        self._run_id = run_id or created
        self._replayer: buffer.Replayer | None = None
        self._down = reason  # the outage warned about at start, if any
        # The journal directory is made on the first record, so a logger that records nothing
        # leaves nothing behind; a continued run appends to its earlier unsent journal.
        self._journal = (self._earlier_journal(self._root, target, run_id)
                         if run_id is not None else None)
        if reason is not None:  # once for this run: its sender does not say it again
            log.warning("tracking server %s unreachable (%s); recording in %s and sending when "
                        "it answers", target, reason, self._root)
        if run_id is None and created is None:
            self._append("create", experiment=experiment, run_name=run_name, tags=all_tags,
                         artifact_location=_artifact_location(target))
        elif run_id is not None:
            self._append("status", status="RUNNING", run_name=run_name)
            for key in buffer.FAILURE_TAGS:
                self._append("delete_tag", key=key)
            self._append_chunks("tags", all_tags, MAX_PARAMS_PER_BATCH)

    @staticmethod
    def _open(uri: str, experiment: str, run_id: str | None, run_name: str | None,
              tags: dict[str, str], sweep_id: str | None) -> tuple[str, str | None]:
        """Prepare the store and create the run now; (experiment id, new run id or None)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            experiment_id = prepare_store(uri, experiment)
        except TrackingError as err:
            if err.__cause__ is not None and buffer.is_transient(err.__cause__):
                raise _Unreachable(buffer.describe(err.__cause__)) from err
            raise
        if run_id is not None:
            return experiment_id, None
        try:
            if sweep_id is not None and "mlflow.parentRunId" not in tags:
                parent = find_sweep_parent(uri, experiment_id, sweep_id)
                if parent is not None:
                    tags["mlflow.parentRunId"] = parent
            run = MlflowClient(tracking_uri=uri).create_run(experiment_id, tags=tags,
                                                            run_name=run_name)
        except MlflowException as err:
            if buffer.is_transient(err):
                raise _Unreachable(buffer.describe(err)) from err
            raise TrackingError(f"tracking store {uri}: {buffer.describe(err)}") from err
        except OSError as err:
            raise _Unreachable(buffer.describe(err)) from err
        return experiment_id, run.info.run_id

    @staticmethod
    def _earlier_journal(root: Path, uri: str, run_id: str) -> buffer.Journal | None:
        """An unsent journal of the same run left under ``root`` by an earlier process."""
        for directory in buffer.find_journals(root):
            try:
                journal = buffer.Journal.open(directory)
            except (OSError, ValueError, TypeError):
                continue
            if journal.state.run_id == run_id and journal.state.tracking_uri == uri \
                    and journal.lock():
                return journal
        return None

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        """The run's id in the store; None while a run created offline awaits the server."""
        return self._journal.state.run_id if self._journal is not None else self._run_id

    @property
    def journal(self) -> buffer.Journal:
        """The run's journal (made on first use), sent by a background thread."""
        if self._journal is None:
            self._journal = buffer.Journal.create(self._root, self.tracking_uri,
                                                  self._experiment, self._run_id)
        if self._replayer is None:
            others = [d for d in buffer.find_journals(self._root) if d != self._journal.dir]
            self._replayer = buffer.Replayer(self._journal, others, outage=self._down)
            self._replayer.start()
        return self._journal

    def _append(self, op: str, **fields: Any) -> None:
        try:
            self.journal.append(op, **fields)
        except OSError as err:  # a full or failing disk: say so once, never stop training
            if not self._write_failed:
                self._write_failed = True
                log.warning("cannot write tracking journal under %s (%s): tracking records "
                            "are lost until it can be written", self._root, err)
            return
        self._replayer.notify()

    def _append_chunks(self, op: str, items: Mapping[str, str], size: int) -> None:
        pairs = list(items.items())
        for i in range(0, len(pairs), size):
            self._append(op, **{op: dict(pairs[i:i + size])})

    def log_params(self, params: Mapping[str, Any]) -> None:  # noqa: D102
        self._append_chunks("params", flatten_config(params), MAX_PARAMS_PER_BATCH)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:  # noqa: D102
        import time

        now_ms = int(time.time() * 1000)
        items = [[k, float(v), now_ms, int(step or 0)] for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._append("metrics", metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:  # noqa: D102
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact {path} does not exist")
        try:
            stored = self.journal.stash(path)
        except OSError as err:
            log.warning("cannot copy artifact %s into tracking journal %s (%s): not recorded",
                        path, self.journal.dir, err)
            return
        self._append("artifact", file=stored, artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:  # noqa: D102
        self._append_chunks("tags", {k: str(v) for k, v in tags.items()}, MAX_PARAMS_PER_BATCH)

    def set_status(self, status: str) -> None:
        """Set a status that does not end the run (``SCHEDULED``, ``RUNNING``)."""
        if status not in ("SCHEDULED", "RUNNING"):
            raise ValueError(f"status {status!r}: use finish() to end a run")
        self._append("status", status=status)

    def finish(self, status: str = "FINISHED") -> None:  # noqa: D102
        if status not in STATUSES:
            raise ValueError(f"status {status!r} not one of {STATUSES}")
        if self._finished:
            return
        self._finished = True
        if status == "FINISHED":  # a reason left by an earlier attempt no longer holds
            for key in buffer.FAILURE_TAGS:
                self._append("delete_tag", key=key)
        self._append("status", status=status)
        self.close()

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop sending in the background after waiting up to ``timeout_s`` (default
        ``drain_timeout_s``) for the journal to reach the store; the run's status is left as
        it is. Returns whether everything arrived (the journal is then deleted)."""
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        if self._replayer is None:  # nothing was recorded
            return True
        replayer, journal = self._replayer, self._journal
        sent = replayer.drain(timeout_s)
        replayer.stop()
        # A request in flight ends within MLflow's HTTP timeout; the journal stays consistent
        # either way (acknowledged only once answered), so it is not waited for: the thread
        # releases the journal when it ends.
        replayer.join(timeout=1.0)
        # Anything recorded after this goes to a new journal (and thread) of the same run.
        self._run_id, self._replayer, self._journal = journal.state.run_id, None, None
        if sent and not replayer.is_alive():
            journal.remove()
            with contextlib.suppress(OSError):  # the journal root, when nothing else is left
                journal.dir.parent.rmdir()
            return True
        left = journal.count_pending()
        if left:
            log.warning("%d tracking record(s) not sent to %s within %.0f s; they are kept in "
                        "%s: `python -m jobs.report --sync %s` sends them", left,
                        self.tracking_uri, timeout_s, journal.dir, journal.dir)
        return left == 0


class _Unreachable(Exception):
    """The store did not answer (transient); the message says why."""


def _artifact_location(uri: str) -> str | None:
    """Where an sqlite store's experiments keep artifacts: beside the database."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def record_run_failure(uri: str, experiment: str, run_id: str, reason: str,
                       journal_dir: str | Path, tag: str = buffer.FAILURE_TAGS[0]) -> bool:
    """Mark a run FAILED with ``reason`` (tag ``tag``) unless it recorded a reason of its own;
    a run that ended FAILED or KILLED keeps its status.

    Never raises for a tracking error: when the store cannot be reached, the failure is written
    to a journal under ``journal_dir`` (sent by ``python -m jobs.report --sync`` or the next
    logger there) and a warning says so. Returns whether the store has it now.
    """
    return _now_or_later(uri, experiment, run_id, journal_dir, f"the failure of run {run_id}",
                         "failure", reason=reason, tag=tag)


def record_run_end(uri: str, experiment: str, run_id: str, status: str,
                   journal_dir: str | Path, reason: str = "", reason_tag: str | None = None,
                   tags: Mapping[str, Any] | None = None, clear: tuple[str, ...] = ()) -> bool:
    """End a run as ``status``, setting ``tags``, deleting the tags in ``clear`` and setting
    ``reason`` as ``reason_tag`` unless the run has one (:func:`buffer.apply_end`).

    Never raises for a tracking error; like :func:`record_run_failure`, what the store cannot
    take now is journaled under ``journal_dir``. Returns whether the store has it now.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r} not one of {STATUSES}")
    return _now_or_later(uri, experiment, run_id, journal_dir, f"the end of run {run_id}",
                         "end", status=status, reason=reason, reason_tag=reason_tag,
                         tags={k: str(v) for k, v in (tags or {}).items()}, clear=list(clear))


def _now_or_later(uri: str, experiment: str, run_id: str, journal_dir: str | Path, what: str,
                  op: str, **fields: Any) -> bool:
    """Apply one journal record to the store now, or journal it when the store is down."""
    from mlflow.tracking import MlflowClient

    send = {"failure": buffer.apply_failure, "end": buffer.apply_end}[op]
    try:
        send(MlflowClient(tracking_uri=uri), run_id, **fields)
        return True
    except Exception as err:  # the caller (a sweep's driver) must go on
        if not buffer.is_transient(err):
            log.warning("could not record %s in %s: %s", what, uri, buffer.describe(err))
            return False
        try:
            journal = buffer.Journal.create(journal_dir, uri, experiment, run_id)
            journal.append(op, **fields)
            journal.unlock()
            kept = f"kept in {journal.dir} (`python -m jobs.report --sync {journal_dir}`)"
        except OSError as disk:
            kept = f"and could not be kept: {disk}"
        log.warning("tracking store %s unavailable (%s): %s is %s", uri, buffer.describe(err),
                    what, kept)
        return False


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
                       store_dir: str | Path = ".", run_name: str | None = None,
                       journal_dir: str | Path | None = None) -> MlflowLogger:
    """Create the parent run of a sweep; start it before launching the sweep's points.

    Points created afterwards with the same ``sweep_id`` nest under it. Creating it also
    prepares a fresh sqlite store, so parallel points do not race to create it.
    """
    return MlflowLogger(uri=uri, experiment=experiment, store_dir=store_dir,
                        run_name=run_name or f"sweep {sweep_id}",
                        tags={SWEEP_TAG: sweep_id, KIND_TAG: "sweep"}, parent_run_id=None,
                        log_environment=True, journal_dir=journal_dir)


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
