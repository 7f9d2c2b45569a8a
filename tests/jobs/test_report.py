"""The scaling report built from recorded MLflow runs: numbers, failed points, files, artifacts."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest
from _scale_helpers import REPO
from mlflow.tracking import MlflowClient

from squall.scaling.report import collect_rows, report_sweep
from squall.scaling.sweep import FAILURE_TAG, SweepState, plan_point_run, record_failure
from squall.tracking import MlflowLogger, local_store_uri, start_sweep_parent
from squall.tracking import metrics as M

# (gpus, samples/s, peak GiB): 1 -> 2 -> 4 GPUs at 90 % and 75 % efficiency.
MEASURED = [(1, 10.0, 3.0), (2, 18.0, 2.0), (4, 30.0, 1.5)]


@pytest.fixture
def recorded(tmp_path, mlflow_schema_db):
    """A sweep of five points in an embedded store: three measured, one that raised in its job,
    one killed without a word (its run still RUNNING, as a dead job leaves it)."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_schema_db, tmp_path / "mlruns" / "mlflow.db")
    uri = local_store_uri(tmp_path)
    parent = start_sweep_parent("s-test", uri=uri, experiment="scaling", store_dir=tmp_path)
    state = SweepState("s-test", str(tmp_path / "sweep"), uri, "scaling", parent.experiment_id,
                       parent.run_id, title="strong_scaling on test")
    for job, (gpus, rate, mem) in enumerate(MEASURED):
        run_id = plan_point_run(state, job, [f"parallel.gpus={gpus}"], f"#{job}", gpus=gpus)
        with MlflowLogger(uri=uri, experiment="scaling", run_id=run_id,
                          log_environment=False) as run:
            run.log_params({"point.gpus": gpus, "point.nodes": 1, "point.layout": f"dp{gpus}",
                            "point.global_batch": 8, "cluster.gpu_memory_gb": 4})
            run.log_metrics({M.SAMPLES_PER_S: rate, M.STEP_S: 8 / rate, M.STEP_SPREAD: 0.05,
                             M.PEAK_ALLOCATED_GIB: mem, M.HALO_BYTES_PER_STEP: 0.0,
                             M.COMM_SHARE: 0.1 * job}, step=10)
    crashed = plan_point_run(state, 3, ["parallel.gpus=8"], "#3", gpus=8)
    client = MlflowClient(tracking_uri=uri)
    client.set_tag(crashed, FAILURE_TAG, "OutOfMemoryError: CUDA out of memory")
    client.set_terminated(crashed, "FAILED")
    killed = plan_point_run(state, 4, ["parallel.gpus=16"], "#4", gpus=16)
    client.update_run(killed, status="RUNNING")
    record_failure(state, killed, "job 12_4 ended FAILED without a result: Killed")
    state.save()
    return state


def test_rows_carry_speedup_efficiency_and_failures(recorded):
    rows = collect_rows(recorded)
    assert [r.job for r in rows] == [0, 1, 2, 3, 4]
    assert [r.gpus for r in rows] == [1, 2, 4, 8, 16]
    assert [r.speedup for r in rows[:3]] == pytest.approx([1.0, 1.8, 3.0])
    assert [r.efficiency for r in rows[:3]] == pytest.approx([1.0, 0.9, 0.75])
    assert [r.peak_memory_gib for r in rows[:3]] == [3.0, 2.0, 1.5]
    assert [r.status for r in rows] == ["FINISHED"] * 3 + ["FAILED", "FAILED"]
    assert rows[3].reason == "OutOfMemoryError: CUDA out of memory"
    assert rows[4].reason == "job 12_4 ended FAILED without a result: Killed"


def test_report_files_artifacts_and_table(recorded, tmp_path, capsys):
    out = tmp_path / "report"
    report_sweep(recorded, out_dir=out)
    printed = capsys.readouterr().out
    assert "| 2 | 1 | dp2 | 8 | 0.4444 | 0.05 | 18 | 1.80 | 90% | 2 | 0 | 10.0% | FINISHED |  |" in printed
    assert "| 3 | 8 | - |" in printed and "OutOfMemoryError: CUDA out of memory" in printed
    assert "2 of 5 point(s) failed" in printed
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["efficiency"] for t in table[:3]] == ["1.0", "0.9", "0.75"]
    assert table[4]["reason"].endswith("Killed") and table[4]["samples_per_s"] == ""
    for png in ("throughput_efficiency.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # axes, lines and text
    client = recorded.client()
    logged = sorted(f.path for f in client.list_artifacts(recorded.parent_run_id, "report"))
    assert logged == ["report/memory.png", "report/scaling.csv", "report/scaling.md",
                      "report/throughput_efficiency.png"]
    parent = client.get_run(recorded.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["squall.points_failed"] == "2"


def test_report_command_on_a_sweep_directory(recorded, tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.report", recorded.sweep_dir, "--out",
                           str(tmp_path / "again")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 4 | 16 |" in done.stdout and (tmp_path / "again" / "scaling.md").is_file()


def test_report_command_without_a_sweep(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.report", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path} is not a sweep directory: it has no sweep.json"
