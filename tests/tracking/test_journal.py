"""The tracking journal against a real embedded store: stale failure tags, idempotent replay
after a lost acknowledgement, refused records, a half-written line, ``jobs.report --sync``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.report import main as report_main
from squall.tracking import MlflowLogger, local_store_uri, record_run_end, sync_tree
from squall.tracking.buffer import FAILURE_TAGS, JOURNAL, REJECTED, Journal, find_journals

FAILURE_TAG = FAILURE_TAGS[0]


@pytest.fixture
def store_dir(tmp_path, mlflow_schema_db, monkeypatch) -> Path:
    """A run directory whose embedded store (``mlruns/mlflow.db``) already has its schema."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_schema_db, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path


def test_failure_tag_set_by_failed_attempt_is_gone_when_the_run_finishes(store_dir):
    first = MlflowLogger(store_dir=store_dir, experiment="requeue", log_environment=False,
                         journal_dir=store_dir / "journal")
    first.log_metrics({"loss/train": 2.0}, step=0)
    first.set_tags({FAILURE_TAG: "CUDA out of memory"})
    first.finish("FAILED")
    client = MlflowClient(tracking_uri=first.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.data.tags[FAILURE_TAG] == "CUDA out of memory"

    # The requeued attempt continues the same run and ends well.
    second = MlflowLogger(store_dir=store_dir, experiment="requeue", log_environment=False,
                          run_id=first.run_id, journal_dir=store_dir / "journal")
    second.log_metrics({"loss/train": 1.0}, step=1)
    second.finish("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert FAILURE_TAG not in run.data.tags
    history = client.get_metric_history(first.run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0)]
    # Clearing a tag that is not there is not an error: nothing refused, nothing left.
    assert find_journals(store_dir / "journal") == []


@pytest.mark.slow
def test_replay_after_a_lost_acknowledgement_sends_nothing_twice(store_dir):
    uri = local_store_uri(store_dir)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("replay")
    run_id = client.create_run(experiment).info.run_id
    journal = Journal.create(store_dir / "journal", uri, "replay", run_id)
    steps = range(2500)  # three log_batch requests (1000 metrics each at most)
    for step in steps:
        journal.append("metrics", metrics=[["loss/train", 1.0 / (step + 1), 1000 + step, step]])
    journal.append("status", status="FINISHED")
    journal.unlock()
    # The state as it was before anything was acknowledged: as if the process had died after
    # the store stored each batch but before the acknowledgement reached the disk.
    before = store_dir / "before"
    shutil.copytree(journal.dir, before)

    (result,) = sync_tree(store_dir / "journal")
    assert (result.sent, result.left, result.error) == (len(steps) + 1, 0, None)
    assert not journal.dir.exists()  # everything arrived: deleted
    shutil.copytree(before, journal.dir)
    (again,) = sync_tree(store_dir / "journal")
    assert again.left == 0

    history = client.get_metric_history(run_id, "loss/train")
    assert [m.step for m in history] == list(steps)
    assert [m.value for m in history] == [1.0 / (s + 1) for s in steps]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_refused_record_is_kept_aside_and_the_rest_arrives(store_dir):
    run = MlflowLogger(store_dir=store_dir, experiment="refused", log_environment=False,
                       journal_dir=store_dir / "journal")
    run.log_params({"lr": 0.1})
    run.log_params({"lr": 0.2})  # MLflow refuses to change a param
    run.log_metrics({"loss/train": 1.0}, step=3)
    run.set_tags({"layout": "dp1"})
    journal = run.journal
    run.finish()
    got = MlflowClient(tracking_uri=run.tracking_uri).get_run(run.run_id)
    assert got.data.params == {"lr": "0.1"}
    assert got.data.metrics == {"loss/train": 1.0} and got.data.tags["layout"] == "dp1"
    assert got.info.status == "FINISHED"
    # The refused record is kept with the store's answer, beside the (deleted) journal.
    assert not journal.dir.exists()
    assert journal.rejected_path.name == f"{journal.state.journal_id}.{REJECTED}"
    (line,) = journal.rejected_path.read_text().splitlines()
    rejected = json.loads(line)
    assert rejected["record"]["params"] == {"lr": "0.2"}
    assert "Changing param values is not allowed" in rejected["error"]


def test_a_half_written_last_line_is_cut_and_the_journal_goes_on(store_dir):
    uri = local_store_uri(store_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("torn")).info.run_id
    journal = Journal.create(store_dir / "journal", uri, "torn", run_id)
    journal.append("metrics", metrics=[["loss/train", 1.0, 1000, 0]])
    journal.unlock()
    with open(journal.dir / JOURNAL, "ab") as f:  # a process killed in the middle of a write
        f.write(b'{"op":"metrics","metrics":[["loss/tr')
    reopened = Journal.open(journal.dir)
    assert reopened.lock()  # the next process to take it cuts the half line
    assert reopened.count_pending() == 1
    reopened.append("metrics", metrics=[["loss/train", 0.5, 2000, 1]])
    with open(journal.dir / JOURNAL, "ab") as f:  # a line damaged on disk
        f.write(b"\x00\x00garbage\n")
    reopened.append("metrics", metrics=[["loss/train", 0.25, 3000, 2]])
    reopened.unlock()
    assert report_main(["--sync", str(store_dir)]) == 0
    history = client.get_metric_history(run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    (kept,) = reopened.rejected_path.read_text().splitlines()  # the damaged line, set aside
    assert "garbage" in json.loads(kept)["record"]["line"]


def test_sync_of_a_directory_without_journals(tmp_path, capsys):
    assert report_main(["--sync", str(tmp_path)]) == 0
    assert "nothing to send" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        report_main(["--sync", str(tmp_path / "missing")])
    assert stop.value.code == 2
    assert "is not a directory" in capsys.readouterr().err


def test_end_recorded_by_a_driver_keeps_the_points_own_reason_and_clears_stale_ones(store_dir):
    uri = local_store_uri(store_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("ends")).info.run_id
    client.set_tag(run_id, FAILURE_TAG, "loss became nan at step 12")
    assert record_run_end(uri, "ends", run_id, "FAILED", store_dir / "journal",
                          reason="job 3 ended FAILED", reason_tag=FAILURE_TAG,
                          tags={"slurm.state": "FAILED"})
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["slurm.state"] == "FAILED"
    assert run.data.tags[FAILURE_TAG] == "loss became nan at step 12"  # the point knew better
    # A requeued attempt that completes: the earlier reasons are stale.
    client.set_tag(run_id, "squall.interrupted", "preempted; requeued")
    assert record_run_end(uri, "ends", run_id, "FINISHED", store_dir / "journal",
                          tags={"slurm.state": "COMPLETED"}, clear=FAILURE_TAGS)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["slurm.state"] == "COMPLETED"
    assert not set(FAILURE_TAGS) & set(run.data.tags)
    assert not (store_dir / "journal").exists()  # the store answered: nothing journaled


def test_a_continued_run_sends_what_its_earlier_attempt_left_first(store_dir):
    uri = local_store_uri(store_dir)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("continued")).info.run_id
    # What an attempt killed during an outage leaves: steps 0-4 and its KILLED status, unsent.
    left = Journal.create(store_dir / "journal", uri, "continued", run_id)
    for step in range(5):
        left.append("metrics", metrics=[["loss/train", float(step), 1000 + step, step]])
    left.append("status", status="KILLED")
    left.unlock()

    run = MlflowLogger(store_dir=store_dir, experiment="continued", run_id=run_id,
                       log_environment=False, journal_dir=store_dir / "journal")
    assert run.journal.dir == left.dir  # the same journal, appended to
    for step in range(5, 10):
        run.log_metrics({"loss/train": float(step)}, step=step)
    run.finish("FINISHED")
    history = client.get_metric_history(run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in range(10)]
    assert client.get_run(run_id).info.status == "FINISHED"  # the last word is the last attempt's
    assert find_journals(store_dir / "journal") == []
