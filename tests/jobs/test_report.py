"""The scaling report built from recorded MLflow runs: numbers, failed points, files, artifacts."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _scale_helpers import REPO
from mlflow.tracking import MlflowClient

from squall.scaling.report import (
    WARNING_TAG,
    collect_rows,
    report_sweep,
    warnings_of,
)
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


def _sweep(tmp_path, schema_db, title: str) -> SweepState:
    """An empty sweep (parent run, no points) in an embedded store under ``tmp_path``."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(schema_db, tmp_path / "mlruns" / "mlflow.db")
    uri = local_store_uri(tmp_path)
    parent = start_sweep_parent("s-" + title, uri=uri, experiment="scaling", store_dir=tmp_path)
    state = SweepState("s-" + title, str(tmp_path / "sweep"), uri, "scaling",
                       parent.experiment_id, parent.run_id, title=f"{title} on test")
    state.save()
    return state


def _point(state, job: int, overrides: list[str], tags: dict, metrics: dict, gpus: int = 1):
    """A finished point that measured ``metrics`` and carries ``tags``."""
    run_id = plan_point_run(state, job, overrides, f"#{job}", gpus=gpus)
    with MlflowLogger(uri=state.tracking_uri, experiment="scaling", run_id=run_id,
                      log_environment=False) as run:
        run.log_params({"point.gpus": gpus, "point.nodes": 1, "point.layout": f"mp{gpus}",
                        "point.global_batch": 2})
        run.set_tags(tags)
        run.log_metrics({M.STEP_S: 2 / metrics[M.SAMPLES_PER_S], M.STEP_SPREAD: 0.1,
                         M.PEAK_RSS_GIB: 1.2, M.COMM_SHARE: 0.05, **metrics}, step=5)
    return run_id


def _failed(state, job: int, reason: str, gpus: int) -> None:
    run_id = plan_point_run(state, job, [f"parallel.gpus={gpus}"], f"#{job}", gpus=gpus)
    record_failure(state, run_id, reason)


def test_report_of_a_sweep_without_points(tmp_path, mlflow_schema_db, capsys):
    state = _sweep(tmp_path, mlflow_schema_db, "empty")
    assert report_sweep(state, out_dir=tmp_path / "out") == []
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert "No point of this sweep recorded a run (0 planned in sweep.json)" in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scaling.csv", "scaling.md"]
    assert "no plots" in capsys.readouterr().out
    assert state.client().get_run(state.parent_run_id).info.status == "FINISHED"


@pytest.fixture
def all_failed(tmp_path, mlflow_schema_db) -> SweepState:
    """A sweep whose two points failed before measuring, and a plot left by an earlier report."""
    state = _sweep(tmp_path, mlflow_schema_db, "failing")
    _failed(state, 0, "sbatch: error: Invalid generic resource (gres) specification", 1)
    _failed(state, 1, "LayoutError: batch 3 does not split over 2 data-parallel ranks", 2)
    old = tmp_path / "sweep" / "report"
    old.mkdir(parents=True)
    (old / "memory.png").write_bytes(b"plot of an earlier report")
    return state


def test_report_of_a_sweep_whose_points_all_failed(all_failed, capsys):
    report_sweep(all_failed)
    printed = capsys.readouterr().out
    assert "| 1 | 2 | - |" in printed and "Invalid generic resource" in printed
    assert "All 2 point(s) failed; reasons in the table" in printed
    out = Path(all_failed.sweep_dir) / "report"
    assert sorted(p.name for p in out.iterdir()) == ["scaling.csv", "scaling.md"]
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["status"] for t in table] == ["FAILED", "FAILED"]
    assert table[1]["reason"].startswith("LayoutError: batch 3")


@pytest.mark.slow
def test_report_command_on_an_all_failed_sweep_exits_0(all_failed):
    done = subprocess.run([sys.executable, "-m", "jobs.report", all_failed.sweep_dir], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "All 2 point(s) failed; reasons in the table" in done.stdout


def test_a_fallen_back_backend_is_marked_and_the_void_comparison_said(tmp_path, mlflow_schema_db):
    state = _sweep(tmp_path, mlflow_schema_db, "kernel_compare")
    base = {"point.attention_backend_used": "torch", "point.rank0_host": "cpu-node"}
    _point(state, 0, ["model.attention_backend=torch"],
           base | {"point.attention_backend": "torch"}, {M.SAMPLES_PER_S: 20.0})
    _point(state, 1, ["model.attention_backend=triton"],
           base | {"point.attention_backend": "triton",
                   "point.attention_fallback": "tensors are on cpu"}, {M.SAMPLES_PER_S: 17.4})
    out = tmp_path / "out"
    rows = report_sweep(state, out_dir=out, print_table=False)
    assert [r.series for r in rows] == [
        "model.attention_backend=torch",
        "model.attention_backend=triton -> torch (tensors are on cpu)"]
    md = (out / "scaling.md").read_text()
    assert "| attention ran |" in md and "| triton -> torch (tensors are on cpu) |" in md
    assert ("Warning: every measured point ran the same attention code (torch): this comparison "
            "of torch, triton measures nothing") in md
    assert "Same on every point: rank0_host cpu-node." in md
    assert sorted(p.name for p in out.glob("*.png")) == ["comparison.png"]
    parent = state.client().get_run(state.parent_run_id)
    assert "fell back on 1 of 2 point(s) (triton -> torch: tensors are on cpu)" in (
        parent.data.tags[WARNING_TAG])


def test_a_backend_that_ran_is_not_flagged(tmp_path, mlflow_schema_db):
    state = _sweep(tmp_path, mlflow_schema_db, "gpu_compare")
    for job, name in enumerate(("torch", "triton")):
        _point(state, job, [f"model.attention_backend={name}"],
               {"point.attention_backend": name, "point.attention_backend_used": name},
               {M.SAMPLES_PER_S: 10.0 + job})
    rows = collect_rows(state)
    assert [r.attention for r in rows] == ["torch", "triton"]
    assert warnings_of(rows) == []


def test_partition_compare_plots_halo_and_imbalance(tmp_path, mlflow_schema_db):
    state = _sweep(tmp_path, mlflow_schema_db, "partition_compare")
    for job, (name, halo, edges, nodes) in enumerate(
            [("sfc", 3.1e6, 1.02, 1.00), ("bands", 9.4e6, 1.10, 1.01), ("ranges", 7.7e6, 1.31, 1.0)]):
        _point(state, job, ["parallel.gpus=2", f"parallel.partition={name}"],
               {"point.nodelist": f"node{job}", "point.attempts": str(1 + job // 2)},
               {M.SAMPLES_PER_S: 5.0 - job, M.HALO_BYTES_PER_STEP: halo, M.EDGE_IMBALANCE: edges,
                M.NODE_IMBALANCE: nodes}, gpus=2)
    out = tmp_path / "out"
    rows = report_sweep(state, out_dir=out, print_table=False)
    assert [r.edge_imbalance for r in rows] == [1.02, 1.10, 1.31]
    md = (out / "scaling.md").read_text()
    assert "| ran on | edge imbalance | node imbalance | attempts | status |" in md
    assert "| node2 | 1.310 | 1.000 | 2 | FINISHED |" in md
    assert "efficiency" not in md  # three partitions at one size: nothing scales
    assert sorted(p.name for p in out.glob("*.png")) == ["comparison.png", "partition.png"]
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["ran_on"] for t in table] == ["node0", "node1", "node2"]
    assert [t["point.attempts"] for t in table] == ["1", "1", "2"]
    assert [t["halo_bytes"] for t in table] == ["3100000.0", "9400000.0", "7700000.0"]
