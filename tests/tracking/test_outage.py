"""Tracking server outages, injected for real: the test's own ``mlflow server`` is killed and
started again on the same port and store while a run logs. Training must neither raise nor wait
on the server; every metric step must arrive exactly once, in order; statuses must be final."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from squall.scaling.sweep import FAILURE_TAG, SweepState, record_failure
from squall.tracking import MlflowLogger, sync_tree
from squall.tracking.buffer import JOURNAL_TAG, find_journals

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: A logging call only appends a line to a local file (one fsync, milliseconds). One request to
#: a server that refuses connections takes MLflow's client about 4 s (2 retries, backoff factor
#: 2: urllib3 sleeps 0 s then 4 s), so a call that waited on the server once would exceed this.
MAX_CALL_S = 1.0
#: finish() waits this long for the journal to arrive after the server is back; the backoff is
#: at most 30 s (buffer.BACKOFF_MAX_S), finish() retries every second, and a restarted server
#: answers within seconds.
DRAIN_S = 60.0


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_training_goes_on_through_an_outage_and_every_step_arrives_once(
        restartable_mlflow_server, tmp_path, caplog):
    server = restartable_mlflow_server
    artifact = tmp_path / "table.csv"
    artifact.write_text("gpus,samples_per_s\n1,10.5\n")
    run = MlflowLogger(uri=server.url, experiment="outage", store_dir=tmp_path,
                       run_name="through-outage", log_environment=False,
                       journal_dir=tmp_path / "journal", drain_timeout_s=DRAIN_S)
    run_id = run.run_id
    assert run_id is not None  # the server answered: created at once
    slowest = 0.0

    def train(steps: range, pause_s: float) -> None:
        nonlocal slowest
        for i in steps:
            start = time.monotonic()
            run.log_metrics({"loss/train": 1.0 / (i + 1), "time/step_s": 0.01 * i}, step=i)
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(pause_s)

    with caplog.at_level(logging.WARNING, logger="squall.tracking"):
        run.log_params({"optim": {"lr": 0.1}})
        train(range(0, 20), 0.02)
        server.stop()  # SIGKILL: connections refused from now on
        # About 8 s of training into a dead server: the sender fails and backs off meanwhile.
        train(range(20, 60), 0.2)
        start = time.monotonic()
        run.set_tags({"layout": "dp1"})
        run.log_artifact(artifact, artifact_path="report")
        slowest = max(slowest, time.monotonic() - start)
        assert run.journal.count_pending() > 0
        server.start()
        train(range(60, 80), 0.02)
        run.finish("FINISHED")

    assert slowest < MAX_CALL_S, f"a logging call took {slowest:.2f} s during the outage"
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    down = [m for m in messages if "unavailable" in m]
    back = [m for m in messages if "answers again" in m]
    assert len(down) == 1 and len(back) == 1, messages  # once per outage, not once per call
    assert server.url in down[0] and "\n" not in down[0]

    client = MlflowClient(tracking_uri=server.url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"optim.lr": "0.1"} and got.data.tags["layout"] == "dp1"
    assert steps_of(client, run_id, "loss/train") == [(i, 1.0 / (i + 1)) for i in range(80)]
    assert [s for s, _ in steps_of(client, run_id, "time/step_s")] == list(range(80))
    assert [f.path for f in client.list_artifacts(run_id, "report")] == ["report/table.csv"]
    assert find_journals(tmp_path / "journal") == []  # all sent: nothing left behind


EXITS_DURING_OUTAGE = """
import sys, time
from pathlib import Path
from squall.tracking import MlflowLogger
url, tmp = sys.argv[1], Path(sys.argv[2])
run = MlflowLogger(uri=url, experiment="exited", store_dir=tmp, run_name="exited",
                   log_environment=False, journal_dir=tmp / "0" / "tracking",
                   drain_timeout_s=2)
for i in range(10):
    run.log_metrics({"loss/train": 1.0 / (i + 1)}, step=i)
while not run.journal.drained():
    time.sleep(0.05)
print(run.run_id, flush=True)
sys.stdin.readline()  # the test kills the server meanwhile
start = time.monotonic()
for i in range(10, 30):
    run.log_metrics({"loss/train": 1.0 / (i + 1)}, step=i)
(tmp / "notes.txt").write_text("written during the outage")
run.log_artifact(tmp / "notes.txt")
run.finish("FINISHED")
print(f"{time.monotonic() - start:.3f}", flush=True)
"""


def test_sync_sends_what_was_left_during_an_outage(restartable_mlflow_server, tmp_path, caplog):
    """Three things left while the server is down, all sent by ``jobs.report --sync`` once it
    is back: the journal of a process that exited, a run started while the server was down (no
    run id yet), and a point failure recorded by a sweep's driver."""
    server = restartable_mlflow_server
    client = MlflowClient(tracking_uri=server.url)
    experiment_id = client.create_experiment("offline")
    point = client.create_run(experiment_id, run_name="point").info.run_id
    sweep = tmp_path / "sweep"
    state = SweepState("sweep-x", str(sweep), server.url, "offline", experiment_id)
    proc = subprocess.Popen([sys.executable, "-c", EXITS_DURING_OUTAGE, server.url,
                             str(sweep)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        exited = proc.stdout.readline().strip()
        assert exited, proc.stderr.read()[-3000:]
        server.stop()
        # Bounded: 2 s of draining plus at most one request in flight (joined for 1 s).
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert float(out.split()[-1]) < 2 + 1 + 1, out  # drain, join, appends
    assert "kept in" in err and "--sync" in err, err[-2000:]

    # A run started while its server is down: no id yet, everything journaled.
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="squall.tracking"):
        run = MlflowLogger(uri=server.url, experiment="offline", store_dir=tmp_path,
                           run_name="started-offline", log_environment=False,
                           journal_dir=sweep / "1" / "tracking", when_unreachable="journal",
                           drain_timeout_s=1)
        assert run.run_id is None
        for i in range(10):
            run.log_metrics({"loss/train": float(i)}, step=i)
        run.finish("FINISHED")
    # The /health probe (3 s at most) and finish's 1 s of draining: no wait on the server.
    assert time.monotonic() - start < 3 + 1 + 1 + 1
    said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()
            or "unavailable" in r.getMessage()]
    assert len(said) == 1, said  # once for the outage

    # The sweep's driver records a point's failure while the server is down: a warning, no
    # exception, and the failure is kept for later.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="squall.tracking"):
        record_failure(state, point, "job 17 ended FAILED without a result")
    assert any("kept in" in r.getMessage() for r in caplog.records)

    journals = find_journals(sweep)
    assert len(journals) == 3
    copies = tmp_path / "copies"
    for j in journals:  # as they were before being sent: to send them a second time below
        shutil.copytree(j, copies / j.relative_to(sweep))
    server.start()
    sync = subprocess.run([sys.executable, "-m", "jobs.report", "--sync", str(sweep)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr[-3000:]
    assert sync.stdout.count("complete") == 3, sync.stdout
    assert f"run {exited}: sent" in sync.stdout
    assert find_journals(sweep) == []

    assert client.get_run(exited).info.status == "FINISHED"
    assert steps_of(client, exited, "loss/train") == [(i, 1.0 / (i + 1)) for i in range(30)]
    assert [f.path for f in client.list_artifacts(exited)] == ["notes.txt"]
    created = client.search_runs([experiment_id], "attributes.run_name = 'started-offline'")
    assert len(created) == 1
    offline = created[0].info.run_id
    assert created[0].info.status == "FINISHED"
    assert steps_of(client, offline, "loss/train") == [(i, float(i)) for i in range(10)]
    failed = client.get_run(point)
    assert failed.info.status == "FAILED"
    assert failed.data.tags[FAILURE_TAG] == "job 17 ended FAILED without a result"

    # Sent again from scratch (as if every answer had been lost): no second run created, no
    # step twice, the failure reason unchanged.
    shutil.copytree(copies, sweep, dirs_exist_ok=True)
    assert [r.left for r in sync_tree(sweep)] == [0, 0, 0]
    again = client.search_runs([experiment_id], f"tags.`{JOURNAL_TAG}` != ''")
    assert [r.info.run_id for r in again] == [offline]
    assert steps_of(client, offline, "loss/train") == [(i, float(i)) for i in range(10)]
    assert steps_of(client, exited, "loss/train") == [(i, 1.0 / (i + 1)) for i in range(30)]
    assert client.get_run(point).data.tags[FAILURE_TAG] == "job 17 ended FAILED without a result"
