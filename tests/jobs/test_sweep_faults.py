"""Faults a Slurm cluster produces in a normal week, injected for real into sweeps on the local
Slurm (.ci/slurm/start.sh): ``scontrol requeue`` and ``scancel`` mid-point, refused and
unschedulable submissions, a driver stopped by Ctrl-C, two sweeps started in the same second.
Each test bounds its waits, and cancels the jobs and stops the driver it started."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from _scale_helpers import (
    TINY,
    run_scale,
    sacct,
    slurm_node,
    start_scale,
    submitted_jobs,
    sweep_state,
    table,
)
from mlflow.tracking import MlflowClient

from squall.scaling.sweep import FAILURE_TAG, INTERRUPT_TAG, SweepState

pytestmark = pytest.mark.slow

# One tiny CPU point through the local Slurm: about 5 s to start, 20 to 30 s of Python, torch and
# MLflow start-up and graph/data set-up on 2 cores, then its steps.
POINT_S = 60
# Whole-node jobs wait for the node to be free: other tests' jobs (or a developer's) may hold it
# for a few minutes first.
QUEUE_S = 240
UNSCHEDULABLE = re.compile(r"point #1 \(job \S+\) cannot be scheduled: PENDING "
                           r"\(Partition(Config|TimeLimit)\); cancelled after "
                           r"scale.pending_limit_s=15")
UNSCHEDULABLE_REASON = re.compile(r"unschedulable: pending \d+ s with reason "
                                  r"Partition(Config|TimeLimit); cancelled by the sweep after "
                                  r"scale.pending_limit_s=15$")
# Long enough to requeue or cancel a point mid-loop: 300 timed steps of the tiny model take
# 8 to 15 s on one CPU rank (0.03 s a step, plus data).
LONG = ["scale.steps=300", "scale.checkpoint_every=20"]


class Sweep:
    """A sweep driver run in the background; stops it and cancels its jobs at exit."""

    def __init__(self, args: list[str], cache: Path) -> None:
        self.proc, self.log = start_scale(["--multirun", *args], cache)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, what, deadline_s: float, message: str):
        """Poll ``what()`` every second until it is truthy; fail after ``deadline_s``."""
        end = time.monotonic() + deadline_s
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > end or (self.proc.poll() is not None and not what()):
                pytest.fail(f"{message} (driver exit {self.proc.poll()}):\n{self.text()[-4000:]}")
            time.sleep(1)

    def finish(self, timeout_s: float) -> str:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sweep still running after {timeout_s} s:\n{self.text()[-4000:]}")
        return self.text()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        jobs = list(submitted_jobs(self.text()).values())
        if jobs:
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)


def logged_at(out: str, text: str) -> float:
    """Epoch seconds of the first driver log line (``[YYYY-mm-dd HH:MM:SS,mmm][HYDRA] ...``)
    holding ``text``."""
    for line in out.splitlines():
        if text in line and line.startswith("["):
            stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    pytest.fail(f"no log line with {text!r}:\n{out[-3000:]}")


def point_run(state, job: int = 0):
    """The MLflow run of point ``job`` (sweep.json read afresh: the driver adds points)."""
    state = SweepState.load(state.sweep_dir)
    return MlflowClient(tracking_uri=state.tracking_uri).get_run(state.points[str(job)])


def wait_in_loop(sweep: Sweep) -> tuple[object, str]:
    """Wait until point #0 is in its timed loop (its run has the first attempt's start tag);
    return the sweep's state and the point's job id."""
    state = sweep.wait_for(lambda: "runs in" in sweep.text() and sweep_state(sweep.text()),
                           60, "the sweep did not start")
    job = sweep.wait_for(lambda: submitted_jobs(sweep.text()).get(0), 90, "nothing submitted")
    state = SweepState.load(state.sweep_dir)
    sweep.wait_for(lambda: "attempt.1.start" in point_run(state).data.tags, QUEUE_S + POINT_S,
                   "the point did not reach its steps")
    return state, job


@pytest.mark.slurm
@pytest.mark.timeout(QUEUE_S + 6 * POINT_S)
def test_requeue_mid_point_resumes_once_in_the_same_run(local_slurm, tmp_path):
    with Sweep(["cluster=local_slurm", *TINY, *LONG, "parallel.gpus=1"], tmp_path) as sweep:
        state, job = wait_in_loop(sweep)
        time.sleep(2)  # a few timed steps
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)
        # Slurm holds a requeued batch job for 2 minutes (BeginTime); release it at once.
        sweep.wait_for(lambda: len(sacct(job)) == 2, 60, "no second record after the requeue")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True,
                       timeout=60)
        out = sweep.finish(4 * POINT_S)
    assert sweep.proc.returncode == 0, out[-3000:]
    # One requeue (Slurm's), no second one by the point; the last attempt decides.
    records = sacct(job)
    assert [r[0] for r in records] == ["REQUEUED", "COMPLETED"], records
    logs = "".join(p.read_text() for p in Path(state.sweep_dir, ".submitit").rglob("*.err"))
    assert "Job is pending execution" not in logs and "Requeued job" not in logs
    [row] = table(out)
    assert row["status"] == "FINISHED" and row["reason"] == "" and row["ran on"] == slurm_node()
    assert "failed" not in out.split("scaling table")[0].lower()
    run = point_run(state)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert FAILURE_TAG not in tags and INTERRUPT_TAG not in tags
    assert tags["point.attempts"] == "2" and tags["slurm.attempts"] == "2"
    assert tags["attempt.1.ended"].startswith("requeued by Slurm (SIGTERM) at step")
    assert tags["attempt.2.ended"] == "completed"
    assert tags["attempt.1.job_id"] == tags["attempt.2.job_id"] == job
    assert [tags[f"attempt.{n}.slurm_state"] for n in (1, 2)] == ["REQUEUED", "COMPLETED"]
    # Timings from the last allocation only: all 300 timed steps again, the first attempt's
    # partial numbers kept in its tags.
    assert metrics["time/measured_steps"] == 300
    assert 0 < int(tags["attempt.1.timed_steps"]) < 300
    assert int(tags["attempt.2.first_step"]) > 1  # resumed from the checkpoint


@pytest.mark.slurm
@pytest.mark.timeout(QUEUE_S + 4 * POINT_S)
def test_scancel_ends_the_point_cancelled_without_requeue(local_slurm, tmp_path):
    with Sweep(["cluster=local_slurm", *TINY, *LONG, "parallel.gpus=1"], tmp_path) as sweep:
        state, job = wait_in_loop(sweep)
        subprocess.run(["scancel", job], check=True, timeout=60)
        out = sweep.finish(2 * POINT_S)
    assert sweep.proc.returncode == 0, out[-3000:]
    records = sacct(job)
    assert [r[0].split()[0] for r in records] == ["CANCELLED"], records  # never requeued
    [row] = table(out)
    assert row["status"] == "KILLED" and row["reason"].startswith("cancelled (scancel): SIGTERM")
    run = point_run(state)
    assert run.info.status == "KILLED"
    assert run.data.tags["slurm.state"] == "CANCELLED" and run.data.tags["point.attempts"] == "1"
    assert run.data.tags["attempt.1.ended"].startswith("cancelled (SIGTERM) at step")


@pytest.mark.slurm
@pytest.mark.timeout(QUEUE_S + 4 * POINT_S)
def test_refused_and_unschedulable_points_do_not_sink_the_sweep(local_slurm, tmp_path):
    # One point per partition: `debug` runs; `tiny` (MaxTime=1 min, .ci/slurm/slurm.conf.in)
    # can never take a 10-minute point (PENDING, PartitionConfig or PartitionTimeLimit as Slurm
    # 22.05 words it); `nosuch` is refused.
    with Sweep(["cluster=local_slurm", *TINY, "parallel.gpus=1", "scale.pending_limit_s=15",
                "cluster.partition=debug,tiny,nosuch"], tmp_path) as sweep:
        sweep.wait_for(lambda: UNSCHEDULABLE.search(sweep.text()), 120,
                       "the pending reason was not reported")
        out = sweep.finish(QUEUE_S + 3 * POINT_S)
    assert sweep.proc.returncode == 0, out[-3000:]
    # Reported within a minute of the submission (the driver's own log times).
    submitted = logged_at(out, "point #1 submitted as job")
    assert logged_at(out, "point #1 (job") - submitted < 60
    state = sweep_state(out)
    rows = table(out)
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED", "FAILED"]
    assert UNSCHEDULABLE_REASON.match(rows[1]["reason"]), rows[1]["reason"]
    assert rows[2]["reason"].startswith("submission refused: sbatch: error: invalid partition "
                                        "specified: nosuch")
    assert "2 of 3 point(s) failed" in out
    jobs = submitted_jobs(out)
    assert sorted(jobs) == [0, 1]  # the refused one never got a job id
    assert [r[0] for r in sacct(jobs[0])] == ["COMPLETED"]
    assert [r[0].split()[0] for r in sacct(jobs[1])] == ["CANCELLED"]
    unschedulable = point_run(state, 1)
    assert unschedulable.info.status == "FAILED"
    assert UNSCHEDULABLE_REASON.match(unschedulable.data.tags[FAILURE_TAG])
    refused = point_run(state, 2)
    assert refused.info.status == "FAILED" and refused.data.tags["slurm.state"] == "REFUSED"
    assert "invalid partition" in refused.data.tags[FAILURE_TAG]


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_impossible_gres_is_reported_and_nothing_is_left_behind(local_slurm, tmp_path):
    done = run_scale(["--multirun", "cluster=local_slurm", *TINY, "hydra.launcher.gres=gpu:99"],
                     tmp_path, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table(done.stdout)
    assert [r["status"] for r in rows] == ["FAILED", "FAILED"]
    for r in rows:
        assert r["reason"].startswith("submission refused: sbatch: error: Invalid generic resource")
    assert submitted_jobs(done.stdout) == {}
    state = sweep_state(done.stdout)
    assert MlflowClient(tracking_uri=state.tracking_uri).get_run(
        state.parent_run_id).info.status == "FINISHED"


@pytest.mark.slurm
@pytest.mark.timeout(QUEUE_S + 4 * POINT_S)
def test_crash_fails_the_slurm_job_and_shared_nodes_are_not_timed_together(local_slurm, tmp_path):
    # cluster.exclusive=false: points may share the node, so the sweep runs them one at a time.
    done = run_scale(["--multirun", "cluster=local_slurm", "cluster.exclusive=false",
                      "experiment=weak_scaling", *TINY, "parallel.gpus=1", "scale.batch=1,64"],
                     tmp_path, timeout=QUEUE_S + 3 * POINT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table(done.stdout)
    assert [r["status"] for r in rows] == ["FINISHED", "FAILED"]
    assert "training windows give no batch of 64" in rows[1]["reason"]
    jobs = submitted_jobs(done.stdout)
    (ok,), (crashed,) = sacct(jobs[0]), sacct(jobs[1])
    assert ok[:2] == ("COMPLETED", "0:0")
    assert crashed[0] == "FAILED" and crashed[1] != "0:0"
    assert ok[4] <= crashed[3] or crashed[4] <= ok[3], (ok, crashed)
    run = point_run(sweep_state(done.stdout), 1)
    assert run.info.status == "FAILED" and run.data.tags["slurm.state"] == "FAILED"


@pytest.mark.slurm
@pytest.mark.timeout(3 * POINT_S)
def test_aborted_driver_cancels_every_job_it_submitted(local_slurm, tmp_path):
    with Sweep(["cluster=local_slurm", *TINY, *LONG], tmp_path) as sweep:
        jobs = sweep.wait_for(lambda: len(submitted_jobs(sweep.text())) == 2 and
                              submitted_jobs(sweep.text()), 90, "the points were not submitted")
        sweep.proc.send_signal(signal.SIGINT)  # Ctrl-C
        out = sweep.finish(60)
    assert sweep.proc.returncode != 0
    assert "sweep aborted (KeyboardInterrupt" in out and "cancelled 2 job(s)" in out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = [sacct(j)[-1][0].split()[0] if sacct(j) else "" for j in jobs.values()]
        if states == ["CANCELLED", "CANCELLED"]:
            break
        time.sleep(1)
    assert states == ["CANCELLED", "CANCELLED"]
    state = sweep_state(out)
    client = MlflowClient(tracking_uri=state.tracking_uri)
    assert client.get_run(state.parent_run_id).info.status == "KILLED"
    for job in ("0", "1"):
        assert client.get_run(state.points[job]).info.status == "KILLED"


@pytest.mark.timeout(4 * POINT_S)
def test_two_sweeps_started_in_the_same_second_stay_apart(tmp_path):
    # The local launcher: no Slurm needed. Both drivers start together and share the cache; the
    # default directory's timestamp is pinned, so that both have the same "second" for sure.
    same_second = "hydra.sweep.dir=${paths.cache}/sweeps/2026-01-01_00-00-00_${sweep_uid:}"
    procs = [start_scale(["--multirun", *TINY, "parallel.gpus=1", same_second], tmp_path)
             for _ in range(2)]
    outs = []
    for proc, log in procs:
        proc.wait(timeout=3 * POINT_S)
        outs.append(log.read_text())
        assert proc.returncode == 0, outs[-1][-3000:]
    states = [sweep_state(out) for out in outs]
    names = sorted(Path(state.sweep_dir).name for state in states)
    assert names[0] != names[1] and all(n.startswith("2026-01-01_00-00-00_") for n in names)
    assert states[0].sweep_id != states[1].sweep_id
    client = MlflowClient(tracking_uri=states[0].tracking_uri)
    for state, out in zip(states, outs, strict=True):
        assert f"scaling table of sweep {state.sweep_id}:" in out
        assert client.get_run(state.parent_run_id).info.status == "FINISHED"
        children = client.search_runs([state.experiment_id],
                                      f"tags.mlflow.parentRunId = '{state.parent_run_id}'")
        assert [c.info.run_id for c in children] == [state.points["0"]]
        assert children[0].info.status == "FINISHED"
        assert children[0].data.tags["point.attempts"] == "1"  # nothing resumed from the other
        assert (Path(state.sweep_dir) / "report" / "scaling.md").is_file()


def test_existing_sweep_directory_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    done = run_scale(["--multirun", *TINY, f"hydra.sweep.dir={taken}"], tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: sweep directory {taken} exists already")
    assert list(taken.iterdir()) == []
