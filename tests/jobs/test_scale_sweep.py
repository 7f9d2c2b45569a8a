"""Real sweeps end to end: `python -m jobs.scale --multirun` on this machine (submitit's local
executor, gloo ranks) and through the local Slurm into a real MLflow server over HTTP."""

from __future__ import annotations

import socket

import pytest
import torch
from _scale_helpers import (
    TINY,
    run_scale,
    sacct,
    slurm_node,
    submitted_jobs,
    sweep_state,
    table,
    table_rows,
)
from mlflow.tracking import MlflowClient

from squall.scaling.sweep import FAILURE_TAG
from squall.tracking import local_store_uri

pytestmark = pytest.mark.slow


def test_default_local_sweep_falls_back_to_local_store_and_prints_table(tmp_path, unused_port):
    # The README's main command on the tiny problem, with a tracking server that is down.
    dead = f"http://127.0.0.1:{unused_port}"
    done = run_scale(["--multirun", *TINY, f"tracking.uri={dead}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    store = local_store_uri(tmp_path / "mlflow")
    assert f"tracking server {dead} unreachable: this sweep is recorded in {store}" in done.stdout
    rows = table_rows(done.stdout)
    assert [r[:4] for r in rows] == [["0", "1", "1", "dp1"], ["1", "2", "1", "dp2"]]
    assert [r[-2] for r in rows] == ["FINISHED", "FINISHED"]
    assert rows[0][8:10] == ["1.00", "100%"] and rows[1][9].endswith("%")
    # The 2-rank point gets the scaling model's prediction, calibrated on the 1-rank point through
    # the runs' own configs, graph cache and the links of conf/cluster/local.yaml.
    named = table(done.stdout)
    assert named[0]["predicted s/step"] == "-"
    predicted, measured = float(named[1]["predicted s/step"]), float(named[1]["s/step"])
    # The table rounds both times to 4 significant digits (<= 5e-4 relative each) and the error to
    # 0.1 %: the error it prints and the one recomputed from its rounded times agree to 0.2 %.
    error = float(named[1]["s/step error"].rstrip("%")) / 100
    assert predicted > 0 and abs(error - (predicted / measured - 1)) <= 2e-3
    assert "Predicted by the scaling model (squall.planning.scaling) calibrated on point #0" in (
        done.stdout)
    assert "with the links of cluster local" in done.stdout

    state = sweep_state(done.stdout)
    assert state.tracking_uri == store and state.fallback_from == dead
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(state.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(state.parent_run_id, "report")} >= {
        "report/scaling.md", "report/scaling.csv", "report/throughput_efficiency.png",
        "report/memory.png"}
    for job, gpus in (("0", 1), ("1", 2)):
        run = client.get_run(state.points[job])
        data = run.data
        assert run.info.status == "FINISHED"
        assert run.info.run_name.startswith(f"#{job} dp{gpus} gpus={gpus}"), run.info.run_name
        assert data.tags["mlflow.parentRunId"] == state.parent_run_id
        assert data.tags["sweep_id"] == state.sweep_id
        assert data.params["point.layout"] == f"dp{gpus}" and data.params["point.gpus"] == str(gpus)
        assert data.tags["point.backend"] == "gloo" and data.tags["env.git_sha"]
        # The point ran here, in this interpreter's environment.
        assert data.tags["env.hostname"] == socket.gethostname()
        assert data.tags["env.torch"] == torch.__version__ and "env.gpu_name" in data.tags
        # Every rank's memory, the step-time spread and communication of the point.
        ranks = {k for k in data.metrics if k.startswith("memory/peak_rss_GiB/rank")}
        assert ranks == {f"memory/peak_rss_GiB/rank{r}" for r in range(gpus)}
        assert data.metrics["time/measured_steps"] == 3
        assert (data.metrics["comm/bytes_per_step"] > 0) == (gpus > 1)
        history = client.get_metric_history(run.info.run_id, "time/last_step_s")
        assert [m.step for m in history] == [1, 2, 3, 4]  # warm-up 1 + 3 timed, every step
        # The summary is made of the 3 timed steps the run logged: their median, percentiles
        # within their range, and the global batch (2, strong scaling) over their time.
        timed = sorted(m.value for m in history if m.step > 1)
        assert data.metrics["time/step_s"] == timed[1]
        assert timed[0] <= data.metrics["time/step_p10_s"] <= timed[1] <= \
            data.metrics["time/step_p90_s"] <= timed[2]
        assert data.metrics["throughput/samples_per_s"] == pytest.approx(2 * 3 / sum(timed),
                                                                         rel=1e-9)
    assert (tmp_path / "sweeps").is_dir()


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_sweep_into_mlflow_server_with_failing_points(local_slurm, mlflow_server, tmp_path):
    # Through sbatch on the local Slurm: a good point, one that fails in its job (a batch the
    # data cannot give: a crash inside the point) and two refused before launch. Whole nodes
    # (cluster.exclusive, the default): the two jobs never run side by side.
    done = run_scale(["--multirun", "cluster=local_slurm", "experiment=weak_scaling", *TINY,
                      f"tracking.uri={mlflow_server}", "tracking.experiment=slurm-sweep",
                      "parallel.gpus=2,3", "scale.batch=1,64"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = sweep_state(done.stdout)
    assert state.tracking_uri == mlflow_server
    rows = table(done.stdout)
    # One series per batch (the other swept key), not one per command-line override.
    assert [r["series"] for r in rows] == ["scale.batch=1", "scale.batch=64"] * 2
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FAILED", "FAILED"]
    assert rows[0]["ran on"] == slurm_node() and rows[1]["ran on"] == slurm_node()
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([state.experiment_id], f"tags.sweep_id = '{state.sweep_id}'")
    points = {r.info.run_id: r for r in runs if r.data.tags.get("run_kind") == "point"}
    assert len(points) == 4 and set(points) == set(state.points.values())
    status = {(int(r.data.tags["point.gpus"]), r.data.tags["squall.overrides"].split()[-1]):
              r for r in points.values()}
    good = status[(2, "scale.batch=1")]
    assert good.info.status == "FINISHED" and FAILURE_TAG not in good.data.tags
    assert good.data.tags["slurm.state"] == "COMPLETED"
    crashed = status[(2, "scale.batch=64")]
    assert crashed.info.status == "FAILED"
    assert "training windows give no batch of 64" in crashed.data.tags[FAILURE_TAG]
    for batch in (1, 64):
        refused = status[(3, f"scale.batch={batch}")]
        assert refused.info.status == "FAILED"
        assert "parallel.gpus=3 does not split evenly" in refused.data.tags[FAILURE_TAG]
    assert "3 of 4 point(s) failed" in done.stdout
    # The good point ran as a Slurm job: its rank 0 saw Slurm's variables.
    assert good.data.params["point.global_batch"] == "2"
    timed = [m.value for m in client.get_metric_history(good.info.run_id, "time/last_step_s")
             if m.step > 1]  # warm-up 1 (TINY)
    assert good.data.metrics["throughput/samples_per_s"] == pytest.approx(2 * 3 / sum(timed),
                                                                          rel=1e-9)
    # Slurm's accounting tells the truth: the crash is FAILED with a non-zero exit code.
    jobs = submitted_jobs(done.stdout)
    assert sorted(jobs) == [0, 1]
    (ok,), (failed,) = sacct(jobs[0]), sacct(jobs[1])
    assert ok[:2] == ("COMPLETED", "0:0")
    assert failed[0] == "FAILED" and failed[1] != "0:0"
    # Whole nodes per point: the two jobs on the one node did not overlap in time.
    assert ok[4] <= failed[3] or failed[4] <= ok[3], (ok, failed)


def test_partition_compare_runs_model_parallel_points(tmp_path):
    # Two ranks share each sample; the graph is partitioned by each scheme in turn.
    done = run_scale(["--multirun", "experiment=partition_compare", *TINY,
                      "parallel.partition=sfc,ranges"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table_rows(done.stdout)
    assert [(r[1], r[2], r[4], r[-2]) for r in rows] == [
        ("parallel.partition=sfc", "2", "dp1xmp2", "FINISHED"),
        ("parallel.partition=ranges", "2", "dp1xmp2", "FINISHED")]
    state = sweep_state(done.stdout)
    client = MlflowClient(tracking_uri=state.tracking_uri)
    for job in ("0", "1"):
        metrics = client.get_run(state.points[job]).data.metrics
        assert metrics["halo/rows_sent"] > 0 and metrics["halo/bytes_per_step"] > 0
        assert set(k for k in metrics if "/rank" in k) == {
            "memory/peak_rss_GiB/rank0", "memory/peak_rss_GiB/rank1"}
