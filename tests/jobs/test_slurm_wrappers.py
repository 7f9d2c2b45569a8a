"""The hand-written wrappers and Slurm's facts in MLflow, on the real local Slurm.

jobs/slurm/train.sbatch requeued by ``scontrol requeue``: the second start continues the first
one's MLflow run from its checkpoint and appends to the same log. A job array's tasks record their
job, array and node facts (squall.tracking.environment), checked against sacct.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _scale_helpers import REPO

from squall.tracking.logger import local_store_uri

# Tiny problem for jobs.train: an O8 grid, 60 synthetic times, a 16-channel model.
TINY_TRAIN = [
    "graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
    "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
    "data.train.start=0", "data.train.end=39", "data.validation.start=40", "data.validation.end=59",
    "data.test.start=40", "data.test.end=59", "model.num_channels=16", "model.num_heads=2",
    # Never reached: the test requeues, then stops the job itself, so how fast steps run here
    # (10 ms to 2 s on a loaded 2-core machine) does not decide what is tested.
    "training.max_steps=100000", "training.checkpoint_every=5", "training.log_every=5",
    "training.val_every=100000",
]  # fmt: skip
# Each start imports torch and builds the graph and model (~15 s on 2 idle cores, ~60 s loaded);
# two starts and a few checkpoints fit well within this.
TRAIN_DEADLINE_S = 420
ARRAY_DEADLINE_S = 120


def slurm_env(local_slurm, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SLURM_CONF=str(local_slurm.conf), **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sacct(job_id: str, fields: str, env: dict, *flags: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-o", fields, "-j", job_id, *flags],
                         capture_output=True, text=True, env=env).stdout
    return [ln.split("|") for ln in out.splitlines() if ln.strip()]


def wait_until(what: str, check, end: float, job_id: str, env: dict, log: Path | None = None):
    """Poll ``check()`` until it returns something true; cancel the job and fail at ``end``."""
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], env=env)
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"job {job_id}: {what} not seen in time\n{tail}")
        time.sleep(0.5)


def job_state(job_id: str, env: dict) -> str:
    rows = sacct(job_id, "State", env, "-X")
    return rows[0][0] if rows else ""


@pytest.mark.slow
@pytest.mark.slurm
def test_requeued_train_wrapper_continues_its_mlflow_run_and_log(local_slurm, tmp_path):
    for name in ("jobs", "conf", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    cache = tmp_path / "cache"
    env = slurm_env(local_slurm, SQUALL_CACHE=str(cache))
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--partition={local_slurm.partition}", "--gpus-per-node=0",
         "--cpus-per-task=1", "--mem=4G", "--time=10",
         str(REPO / "jobs" / "slurm" / "train.sbatch"), *TINY_TRAIN],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job_id = submit.stdout.strip().split(";")[0]
    end = time.monotonic() + TRAIN_DEADLINE_S
    log = tmp_path / f"squall-train-{job_id}.out"
    run_dir = cache / "slurm" / "train" / job_id
    ckpt = run_dir / "checkpoint.pt"
    try:
        # First start: requeue once it has written a checkpoint, i.e. while it trains.
        wait_until("a first checkpoint", ckpt.exists, end, job_id, env, log)
        subprocess.run(["scontrol", "requeue", job_id], env=env, check=True, capture_output=True)
        # Slurm holds a requeued batch job for 2 minutes (BeginTime); release it once pending.
        wait_until("the requeued job pending", lambda: subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True,
            text=True).stdout.strip() == "PENDING", end, job_id, env, log)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env,
                       check=True, capture_output=True)
        # Second start: it resumes from the checkpoint and trains on; then stop it for good.
        wait_until("the second start resuming", lambda: log.exists() and "resumed from" in
                   log.read_text() and "attempt 2" in log.read_text(), end, job_id, env, log)
        first_ckpt_after = ckpt.stat().st_mtime
        wait_until("a checkpoint of the second start",
                   lambda: ckpt.stat().st_mtime > first_ckpt_after, end, job_id, env, log)
    finally:
        subprocess.run(["scancel", job_id], env=env)
    wait_until("the end of the job", lambda: job_state(job_id, env) not in
               ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING"), end, job_id, env, log)

    # One log, both starts in it, in order.
    text = log.read_text()
    first, second = text.index(f"job {job_id} attempt 1 "), text.index(f"job {job_id} attempt 2 ")
    trained = re.compile(r"step \d+/100000 loss")  # the trainer's log line every 5 steps
    assert first < second and trained.search(text[first:second]), text[-3000:]
    assert "resumed from" in text[second:] and trained.search(text[second:]), text[-3000:]
    # Slurm saw a requeue, then the cancel.
    states = [row[0] for row in sacct(job_id, "State", env, "-X", "-D")]
    assert states[0] == "REQUEUED" and states[-1].startswith("CANCELLED"), states

    # One MLflow run, continued across both starts, naming the job and the attempt.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=local_store_uri(cache / "mlflow"))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    tags = runs[0].data.tags
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert tags["env.slurm_job_id"] == job_id
    assert tags["env.slurm_restart_count"] == "1"
    assert tags["env.slurm_partition"] == local_slurm.partition
    assert tags["env.slurm_nodelist"] == node
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/train")]
    assert steps == sorted(set(steps)) and len(steps) >= 2, steps  # none logged twice


PROBE = ("import json; from squall.tracking.environment import slurm_facts; "
         "print('FACTS', json.dumps(slurm_facts()))")


@pytest.mark.slow
@pytest.mark.slurm
def test_array_tasks_record_their_slurm_facts(local_slurm, tmp_path):
    env = slurm_env(local_slurm)
    python = REPO / ".venv" / "bin" / "python"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--partition={local_slurm.partition}", "--array=0-1",
         "--cpus-per-task=1", "--mem=1G", "--time=5", f"--output={tmp_path}/%A_%a.out",
         f"--wrap=srun {python} -c \"{PROBE}\""],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    array_id = submit.stdout.strip().split(";")[0]
    end = time.monotonic() + ARRAY_DEADLINE_S

    def ended():
        rows = sacct(array_id, "State", env, "-X")
        return len(rows) == 2 and all(r[0] not in ("PENDING", "RUNNING", "COMPLETING")
                                      for r in rows)

    wait_until("both array tasks ending", ended, end, array_id, env)
    rows = sacct(array_id, "JobID,JobIDRaw,State,NodeList,Partition,Cluster", env, "-X")
    assert len(rows) == 2
    for job, raw, state, nodes, partition, cluster in rows:
        out = (tmp_path / f"{job}.out").read_text()
        assert state == "COMPLETED", out
        facts = json.loads(next(ln for ln in out.splitlines() if ln.startswith("FACTS "))[6:])
        task = job.split("_")[1]
        assert facts == {
            "slurm_job_id": raw, "slurm_array_job_id": array_id, "slurm_array_task_id": task,
            "slurm_nodelist": nodes, "slurm_num_nodes": "1", "slurm_partition": partition,
            "slurm_cluster": cluster, "slurm_restart_count": "0",
        }


def test_no_slurm_facts_outside_a_job():
    # A process started outside Slurm (this one, without its variables) records none.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "FACTS {}"
