"""A durable journal in front of MLflow: tracking outages never stop or kill training.

Every call of an :class:`~squall.tracking.logger.MlflowLogger` (params, metrics, tags, artifacts,
status) is first appended to a journal on local disk, then sent to the tracking store by a
background thread (:class:`Replayer`) in the order it was made. The training side only ever
writes a line to a local file; while the store cannot be reached (connection refused, timeout,
HTTP 5xx), the thread retries with exponential backoff and warns once per outage.

Layout of one journal, a directory ``<root>/<journal id>/``:

``journal.jsonl``
    One JSON object per call, appended and fsync'd before the call returns; never rewritten.
``state.json``
    Where the journal goes (``tracking_uri``, ``experiment``), the run it maps to (``run_id``,
    known once the run exists in the store) and how far the store has acknowledged it
    (``acked_bytes``, ``acked_records``). Rewritten atomically after each acknowledged batch.
``files/<id>/``
    Copies of artifacts, taken when they were logged (the originals may be temporary).
``rejected.jsonl``
    Records the store refused for good (HTTP 4xx, such as a param logged twice with different
    values), with the store's answer; they are skipped so that the rest still arrives, and kept
    (as ``<root>/<journal id>.rejected.jsonl``) when the journal is deleted.

Exactly once: a batch is acknowledged only after the store answered it. A batch sent again
after a crash or a lost answer is harmless: MLflow keeps one row per metric (key, timestamp,
step, value) and ignores repeated identical params (``SqlAlchemyStore._log_metrics`` and
``_log_params``, MLflow 3.x); tags and statuses are overwritten with the same values. Timestamps
are taken when the call was made, not when it is sent, so a resent metric is identical.

A run that cannot be created because the store is down gets a ``create`` record; the run is
created when the store answers, tagged ``squall.journal_id`` so that a creation whose answer was
lost is found again instead of creating a second run; its id is then kept in ``state.json``.

A journal whose records have all arrived is deleted when its logger closes. One that could not
be sent in time (:meth:`Replayer.drain`) stays, and is sent by :func:`sync_tree`
(``python -m jobs.report --sync DIR``), or by the next logger opened on the same journal root
(a requeued job continuing its run appends to that run's journal, after its leftovers).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from squall.tracking.experiment import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

log = logging.getLogger(__name__)
THREAD_PREFIX = "squall-tracking-"


class _OwnRetries(logging.Filter):
    """Drops urllib3's line per retried request made by a sender thread: the thread says once
    per outage that the store is down, and a line per attempt would flood the job's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith(THREAD_PREFIX)


logging.getLogger("urllib3.connectionpool").addFilter(_OwnRetries())

JOURNAL = "journal.jsonl"
STATE = "state.json"
LOCK = ".lock"
REJECTED = "rejected.jsonl"
FILES = "files"
#: Tag that maps a run created from a journal back to it (finds a creation whose answer was lost).
JOURNAL_TAG = "squall.journal_id"
#: Tags that say why a run ended badly or was stopped: a run set RUNNING again (a requeued
#: attempt) or FINISHED loses them.
FAILURE_TAGS = ("squall.failure_reason", "squall.interrupted")
TERMINAL = ("FINISHED", "FAILED", "KILLED")
#: MLflow's limits per log_batch request (mlflow.utils.validation in 3.x).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTRIES_PER_BATCH = 1000
#: Retry backoff while the store is down: from 0.5 s (a restarted server is back within a
#: second) doubling to 30 s (a long outage costs one failed request every 30 s).
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
#: While finish() waits for the journal, the store is retried at least this often.
DRAIN_RETRY_S = 1.0
#: Records read per replay pass: a few log_batch requests' worth.
READ_RECORDS = 4 * MAX_METRICS_PER_BATCH


@dataclass
class JournalState:
    """Contents of ``state.json``."""

    journal_id: str
    tracking_uri: str
    experiment: str
    run_id: str | None = None
    acked_bytes: int = 0
    acked_records: int = 0
    created_s: float = 0.0


def is_transient(err: BaseException) -> bool:
    """Whether sending again later may succeed: the store was unreachable, timed out or failed
    (HTTP 5xx, 401/403/408/429). A 4xx answer about the request itself is final."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, FileNotFoundError):  # an artifact copy that is gone will not come back
        return False
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return not (400 <= status < 500) or status in (401, 403, 408, 429)
    return isinstance(err, OSError | ConnectionError | TimeoutError) or "requests" in type(
        err
    ).__module__ or "urllib3" in type(err).__module__


def describe(err: BaseException) -> str:
    """One line saying what went wrong with a store request."""
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())[:300]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """One run's journal directory (see the module docstring).

    Use :meth:`create` for a new journal and :meth:`open` for an existing one. Appends are
    thread-safe; only the process holding the lock (:meth:`lock`) sends a journal.
    """

    def __init__(self, directory: str | Path, state: JournalState) -> None:
        self.dir = Path(directory)
        self.state = state
        self._append_lock = threading.Lock()
        self._lock_file: Any = None

    @classmethod
    def create(cls, root: str | Path, tracking_uri: str, experiment: str,
               run_id: str | None = None) -> Journal:
        """A new, empty journal under ``root`` for a run in ``tracking_uri``."""
        journal_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        directory = Path(root) / journal_id
        directory.mkdir(parents=True)
        journal = cls(directory, JournalState(journal_id, tracking_uri, experiment, run_id,
                                              created_s=time.time()))
        # Locked before it can be found (state.json marks a journal): a sender in another
        # process would otherwise take the empty journal for a finished one and delete it.
        journal.lock()
        journal.save_state()
        _fsync_dir(directory.parent)
        return journal

    @classmethod
    def open(cls, directory: str | Path) -> Journal:
        """An existing journal."""
        directory = Path(directory)
        state = JournalState(**json.loads((directory / STATE).read_text()))
        return cls(directory, state)

    @property
    def path(self) -> Path:
        return self.dir / JOURNAL

    def _repair(self) -> None:
        """Cut a last line left half-written by a process that died while appending (its call
        never returned, so nothing acknowledged is lost)."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def lock(self) -> bool:
        """Take this journal for this process (non-blocking); False if another process has it."""
        if self._lock_file is not None:
            return True
        try:
            handle = open(self.dir / LOCK, "a+")
        except FileNotFoundError:  # deleted meanwhile by another sender
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        self._repair()  # only the holder may: another process may be appending until now
        return True

    def unlock(self) -> None:
        """Release :meth:`lock`."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def save_state(self) -> None:
        """Write ``state.json`` atomically and durably."""
        tmp = self.dir / f".{STATE}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(asdict(self.state)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE)

    def append(self, op: str, **fields: Any) -> None:
        """Append one record; it is on disk when this returns."""
        record = {"op": op, "t": int(time.time() * 1000), **fields}
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._append_lock, open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def stash(self, path: Path) -> str:
        """Copy an artifact file or directory into the journal; return its path in it."""
        # A name of its own: copies still waiting to be sent keep theirs across processes.
        dest = self.dir / FILES / uuid.uuid4().hex[:12] / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)
        return str(dest.relative_to(self.dir))

    def size(self) -> int:
        """Bytes written to ``journal.jsonl``."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def pending(self, limit: int = READ_RECORDS) -> list[tuple[int, dict]]:
        """Up to ``limit`` unacknowledged records, each with the byte offset just past it."""
        out: list[tuple[int, dict]] = []
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            f.seek(self.state.acked_bytes)
            offset = self.state.acked_bytes
            for line in f:
                if not line.endswith(b"\n"):  # still being written
                    break
                offset += len(line)
                try:
                    record = json.loads(line)
                except ValueError:  # damaged on disk: refused like any record the store refuses
                    record = {"op": "unreadable", "line": line.decode(errors="replace")}
                out.append((offset, record))
                if len(out) >= limit:
                    break
        return out

    def ack(self, offset: int, records: int) -> None:
        """The store has everything up to byte ``offset`` (``records`` more records)."""
        self.state.acked_bytes = offset
        self.state.acked_records += records
        self.save_state()

    def drained(self) -> bool:
        """Whether every record written so far has been acknowledged."""
        return self.state.acked_bytes >= self.size()

    def count_pending(self) -> int:
        """Number of records not acknowledged yet."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.state.acked_bytes)
            return sum(1 for line in f if line.endswith(b"\n"))

    def reject(self, record: dict, err: BaseException) -> None:
        """Keep a record the store refused for good, with its answer."""
        with open(self.dir / REJECTED, "a") as f:
            f.write(json.dumps({"record": record, "error": describe(err)}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Delete the journal (everything in it has reached the store); records the store
        refused are kept beside it, in ``<journal id>.rejected.jsonl``."""
        rejected = self.dir / REJECTED
        if rejected.exists():
            os.replace(rejected, self.rejected_path)
        self.unlock()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def rejected_path(self) -> Path:
        """Where refused records are kept once the journal is deleted."""
        return self.dir.parent / f"{self.state.journal_id}.{REJECTED}"


def find_journals(directory: str | Path) -> list[Path]:
    """Journal directories at or below ``directory``, oldest first."""
    found = []
    for state in Path(directory).rglob(STATE):
        try:
            if "journal_id" in json.loads(state.read_text()):
                found.append((state.stat().st_mtime, state.parent))
        except (OSError, ValueError):
            continue
    return [d for _, d in sorted(found)]


# ---------------------------------------------------------------------------------------------
# Sending records to the store


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _batchable(record: dict) -> bool:
    return record["op"] in ("params", "metrics", "tags")


def _take_batch(records: list[tuple[int, dict]]) -> int:
    """How many leading records go into one request (a run of params/metrics/tags within
    MLflow's per-request limits, or one other record)."""
    if not _batchable(records[0][1]):
        return 1
    counts = {"params": 0, "metrics": 0, "tags": 0}
    limits = {"params": MAX_PARAMS_PER_BATCH, "metrics": MAX_METRICS_PER_BATCH,
              "tags": MAX_TAGS_PER_BATCH}
    n = 0
    param_keys: set[str] = set()
    for _, record in records:
        if not _batchable(record):
            break
        kind = record["op"]
        size = len(record[kind])
        if n and (counts[kind] + size > limits[kind]
                  or sum(counts.values()) + size > MAX_ENTRIES_PER_BATCH):
            break
        if kind == "params":
            # A param logged again goes in a request of its own: MLflow refuses a changed value,
            # and merging the two would hide that.
            if n and param_keys & record["params"].keys():
                break
            param_keys |= record["params"].keys()
        counts[kind] += size
        n += 1
    return n


def ensure_run(journal: Journal, client, record: dict) -> str:
    """Create the journal's run from its ``create`` record, or find the one created before."""
    from mlflow.exceptions import MlflowException

    name = record["experiment"]
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=record.get("artifact_location"),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            experiment_id = found.experiment_id
    else:
        experiment_id = found.experiment_id
    jid = journal.state.journal_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{JOURNAL_TAG}` = '{jid}'",
                              max_results=1)
    if runs:
        return runs[0].info.run_id
    tags = dict(record.get("tags") or {}, **{JOURNAL_TAG: jid})
    run = client.create_run(experiment_id, start_time=record["t"], tags=tags,
                            run_name=record.get("run_name"))
    return run.info.run_id


def apply_failure(client, run_id: str, reason: str, tag: str = FAILURE_TAGS[0]) -> None:
    """Mark a run FAILED with ``reason`` unless it recorded a reason of its own already; a run
    that ended KILLED or FAILED keeps its status."""
    run = client.get_run(run_id)
    if tag not in run.data.tags:
        client.set_tag(run_id, tag, reason)
    if run.info.status in ("RUNNING", "SCHEDULED", "FINISHED"):
        client.set_terminated(run_id, "FAILED")


def apply_end(client, run_id: str, status: str, reason: str = "", reason_tag: str | None = None,
              tags: dict[str, str] | None = None, clear: Sequence[str] = ()) -> None:
    """End a run as ``status`` (what a sweep's driver learnt from Slurm): set ``tags``, delete
    the tags in ``clear``, set ``reason`` as ``reason_tag`` unless the run has one already."""
    run = client.get_run(run_id)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for key in clear:
        if key in run.data.tags:
            _delete_tag(client, run_id, key)
    if reason and reason_tag and not run.data.tags.get(reason_tag):
        client.set_tag(run_id, reason_tag, reason)
    if run.info.status != status:
        client.set_terminated(run_id, status)


def _delete_tag(client, run_id: str, key: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_tag(run_id, key)
    except MlflowException as err:
        if err.get_http_status_code() != 404:  # no such tag: nothing to clear
            raise


def apply(journal: Journal, client, records: list[dict]) -> None:
    """Send ``records`` (one request's worth, see :func:`_take_batch`) to the store."""
    from mlflow.entities import Metric, Param, RunTag

    first = records[0]
    if first["op"] == "create":
        if journal.state.run_id is None:
            journal.state.run_id = ensure_run(journal, client, first)
            journal.save_state()
        return
    run_id = journal.state.run_id
    if run_id is None:
        from mlflow.exceptions import MlflowException

        raise MlflowException(f"journal {journal.dir} names no run and has no create record",
                              error_code="INVALID_STATE")
    op = first["op"]
    if _batchable(first):
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        metrics: list[Metric] = []
        for record in records:
            if record["op"] == "params":
                params.update(record["params"])
            elif record["op"] == "tags":
                tags.update(record["tags"])
            else:
                metrics.extend(Metric(k, float(v), int(ts), int(step))
                               for k, v, ts, step in record["metrics"])
        client.log_batch(run_id, metrics=metrics,
                         params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    elif op == "delete_tag":
        _delete_tag(client, run_id, first["key"])
    elif op == "artifact":
        local = journal.dir / first["file"]
        if not local.exists():
            raise FileNotFoundError(f"artifact copy {local} is missing")
        if local.is_dir():
            client.log_artifacts(run_id, str(local), first.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(local), first.get("artifact_path"))
    elif op == "status":
        status = first["status"]
        if status in TERMINAL:
            client.set_terminated(run_id, status, end_time=first["t"])
        else:
            client.update_run(run_id, status=status, name=first.get("run_name"))
    elif op == "failure":
        apply_failure(client, run_id, first["reason"], first.get("tag", FAILURE_TAGS[0]))
    elif op == "end":
        apply_end(client, run_id, first["status"], first.get("reason", ""),
                  first.get("reason_tag"), first.get("tags"), first.get("clear", ()))
    else:
        raise ValueError(f"unknown journal record {op!r}")


def _after_ack(journal: Journal, records: list[dict]) -> None:
    """Drop artifact copies once the store has them."""
    for record in records:
        if record["op"] == "artifact":
            shutil.rmtree(journal.dir / Path(record["file"]).parent, ignore_errors=True)


def send_pending(journal: Journal, client, stop: Callable[[], bool] = lambda: False) -> int:
    """Send what the journal holds, in order, acknowledging each answered request.

    Returns
    -------
    int
        Records acknowledged (sent, or refused for good and kept in ``rejected.jsonl``).

    Raises
    ------
    Exception
        The first transient error (:func:`is_transient`); what was sent before is acknowledged.
    """
    done = 0
    while not stop():
        pending = journal.pending()
        if not pending:
            break
        while pending and not stop():
            n = _take_batch(pending)
            chunk, pending = pending[:n], pending[n:]
            records = [r for _, r in chunk]
            try:
                apply(journal, client, records)
            except Exception as err:
                if is_transient(err):
                    raise
                # Refused for good: send the records one by one, each acknowledged, so that only
                # the bad one is set aside.
                for offset, record in chunk:
                    try:
                        apply(journal, client, [record])
                    except Exception as one:
                        if is_transient(one):
                            raise
                        journal.reject(record, one)
                        log.warning("tracking store %s refused a %s record of journal %s "
                                    "(kept in %s): %s", journal.state.tracking_uri,
                                    record["op"], journal.dir, journal.rejected_path,
                                    describe(one))
                    journal.ack(offset, 1)
                    _after_ack(journal, [record])
                    done += 1
                continue
            journal.ack(chunk[-1][0], len(chunk))
            _after_ack(journal, records)
            done += len(chunk)
    return done


class Replayer(threading.Thread):
    """Background sender of one journal (see the module docstring).

    Parameters
    ----------
    journal : Journal
        Locked by the caller.
    others : list of Path
        Leftover journals found beside it, sent once this one is idle.
    outage : str, optional
        Why the store is known to be down already (said by the caller): not warned again.
    """

    def __init__(self, journal: Journal, others: list[Path] | None = None,
                 outage: str | None = None) -> None:
        super().__init__(name=f"{THREAD_PREFIX}{journal.state.journal_id}", daemon=True)
        self.journal = journal
        self.others = list(others or [])
        self._wake = threading.Condition()
        self._stop_flag = False
        self._release = False
        self._outage: str | None = outage
        self._client = None

    def notify(self) -> None:
        """New records were appended: send them now, unless waiting out an outage."""
        if self._outage is None:
            self.kick()

    def kick(self) -> None:
        """Try now, even during an outage."""
        with self._wake:
            self._wake.notify_all()

    def stop(self) -> None:
        """Stop after the request in flight, and release the journal's lock then."""
        with self._wake:
            self._stop_flag = True
            self._release = True
            self._wake.notify_all()

    @property
    def outage(self) -> str | None:
        """Why the store cannot be reached right now, or None."""
        return self._outage

    def _send(self, journal: Journal) -> None:
        if self._client is None:
            self._client = _client(self.journal.state.tracking_uri)
        client = self._client if journal is self.journal else _client(
            journal.state.tracking_uri)
        send_pending(journal, client, stop=lambda: self._stop_flag)

    def run(self) -> None:  # noqa: D102
        try:
            self._run()
        finally:
            if self._release:
                self.journal.unlock()

    def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            with self._wake:
                if self._stop_flag:
                    return
            try:
                self._send(self.journal)
                while self.others and self.journal.drained() and not self._stop_flag:
                    self._sync_other(self.others.pop(0))
            except Exception as err:  # the training side must never see it
                if not is_transient(err):
                    log.warning("tracking journal %s: %s", self.journal.dir, describe(err))
                if self._outage is None:
                    self._outage = describe(err)
                    log.warning("tracking store %s unavailable (%s): records are kept in %s "
                                "and sent when it answers", self.journal.state.tracking_uri,
                                self._outage, self.journal.dir)
                with self._wake:
                    if not self._stop_flag:
                        self._wake.wait(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            if self._outage is not None:
                log.warning("tracking store %s answers again: journal %s sent",
                            self.journal.state.tracking_uri, self.journal.dir)
                self._outage = None
            backoff = BACKOFF_MIN_S
            with self._wake:
                if not self._stop_flag and self.journal.drained():
                    self._wake.wait(BACKOFF_MAX_S)

    def _sync_other(self, directory: Path) -> None:
        try:
            other = Journal.open(directory)
        except (OSError, ValueError, TypeError):
            return
        if not other.lock():
            return
        try:
            self._send(other)
            if other.drained():
                other.remove()
        finally:
            other.unlock()

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything appended so far to be acknowledged."""
        deadline = time.monotonic() + timeout_s
        kicked = 0.0
        while not self.journal.drained():
            now = time.monotonic()
            if now >= deadline or not self.is_alive():
                return self.journal.drained()
            if now - kicked >= DRAIN_RETRY_S:  # retry at least this often while time is short
                self.kick()
                kicked = now
            time.sleep(min(0.05, deadline - now))
        return True


@dataclass
class SyncResult:
    """What :func:`sync_journal` did with one journal."""

    journal: Path
    run_id: str | None
    sent: int
    left: int
    error: str | None = None


def sync_journal(directory: str | Path) -> SyncResult:
    """Send one journal now (once, with the client's own retries); delete it once all of it
    has arrived."""
    journal = Journal.open(directory)
    if not journal.lock():
        return SyncResult(journal.dir, journal.state.run_id, 0, journal.count_pending(),
                          "in use by a running process (it sends the journal itself)")
    try:
        try:
            sent = send_pending(journal, _client(journal.state.tracking_uri))
        except Exception as err:
            return SyncResult(journal.dir, journal.state.run_id, 0, journal.count_pending(),
                              f"{journal.state.tracking_uri}: {describe(err)}")
        result = SyncResult(journal.dir, journal.state.run_id, sent, journal.count_pending())
        if journal.drained():
            journal.remove()
        return result
    finally:
        journal.unlock()


def sync_tree(directory: str | Path) -> list[SyncResult]:
    """Send every journal at or below ``directory`` (a run or sweep directory), oldest first;
    once a store has failed to answer, its other journals are not tried again this time."""
    results, down = [], {}
    for found in find_journals(directory):
        try:
            journal = Journal.open(found)
        except (OSError, ValueError, TypeError):
            continue
        uri = journal.state.tracking_uri
        if uri in down:
            results.append(SyncResult(journal.dir, journal.state.run_id, 0,
                                      journal.count_pending(), down[uri]))
            continue
        result = sync_journal(found)
        if result.error is not None and result.error.startswith(uri):
            down[uri] = result.error
        results.append(result)
    return results
