"""Real faults on a real ``python -m jobs.train`` with the embedded MLflow store: SIGTERM during
start-up and mid-run (exit status, MLflow status, checkpoint, resume into the same run), and a
deleted or truncated dataset chunk (one line, exit 2, before any training step)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from squall.train.runner import END_REASON_TAG, RESUMABLE_TAG, RUN_RECORD, STOP_SIGNAL_TAG
from squall.train.signals import STOPPED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
# A tiny job starts in 10 to 25 s on 2 loaded cores (imports, graph, 60-time dataset, model) and
# trains ~20 steps a second; 300 s bounds a stuck job without failing a slow machine.
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _command(tmp_path, tiny_overrides, *extra):
    args = [a for a in tiny_overrides(tmp_path) if not a.startswith("paths.cache")]
    return [sys.executable, "-m", "jobs.train", *args, *extra, f"hydra.run.dir={tmp_path}/hydra"]


def _env(tmp_path):
    env = {**os.environ, "SQUALL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "SQUALL_PROGRESS": "0"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_job(tmp_path, tiny_overrides, *extra):
    """Run the job to its end; (exit status, stdout + stderr)."""
    out = subprocess.run(_command(tmp_path, tiny_overrides, *extra), cwd=ROOT, env=_env(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=JOB_TIMEOUT_S)  # fmt: skip
    return out.returncode, out.stdout


def signal_job_when(tmp_path, tiny_overrides, marker: str, *extra, signum=signal.SIGTERM):
    """Start the job, send ``signum`` to it as soon as a line contains ``marker``; (exit status,
    output). The job is killed by its pid if it outlives the timeout."""
    proc = subprocess.Popen(_command(tmp_path, tiny_overrides, *extra), cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    lines, sent = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if marker in line and not sent.is_set():
                sent.set()
                proc.send_signal(signum)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert sent.is_set(), "never saw " + marker + "\n" + "".join(lines)[-3000:]
    return proc.returncode, "".join(lines)


def mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from squall.tracking import local_store_uri

    client = MlflowClient(local_store_uri(tmp_path / "mlflow"))
    exp = client.get_experiment_by_name("squall")
    return client, client.search_runs([exp.experiment_id])


def steps(client, run, key="loss/train"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_sigterm_mid_run_checkpoints_exits_75_and_resumes_in_the_same_run(tmp_path,
                                                                          tiny_overrides):
    import torch

    extra = ("training.max_steps=60", "training.checkpoint_every=1000", "data.num_workers=1")
    rc, out = signal_job_when(tmp_path, tiny_overrides, "step 3/60", *extra)
    assert rc == STOPPED_EXIT_CODE, out[-3000:]
    assert "stopped by SIGTERM at step" in out and "Traceback" not in out
    ckpt = tmp_path / "runs" / "o8_l2-tiny" / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=False)
    stopped_at = payload["step"]
    assert 3 <= stopped_at < 60
    client, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"
    assert payload["extra"]["mlflow_run_id"] == run.info.run_id
    tags = run.data.tags
    assert tags[STOP_SIGNAL_TAG] == "SIGTERM" and tags[RESUMABLE_TAG] == "true"
    assert f"at step {stopped_at}" in tags[END_REASON_TAG]
    assert steps(client, run) == list(range(1, stopped_at + 1))

    rc, out = run_job(tmp_path, tiny_overrides, *extra)
    assert rc == 0, out[-3000:]
    (summary,) = [line for line in out.splitlines() if line.startswith('{"summary"')]
    assert json.loads(summary)["summary"]["step"] == 60
    client, (run,) = mlflow_runs(tmp_path)  # still one run
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["squall.attempts"] == "2" and tags[STOP_SIGNAL_TAG] == "none"
    assert tags[END_REASON_TAG] == "finished at step 60" and tags[RESUMABLE_TAG] == "false"
    assert steps(client, run) == list(range(1, 61)), "every step once, in order"
    val = steps(client, run, "loss/val")
    assert len(val) == len(set(val)) and val[-1] == 60
    record = json.loads((ckpt.parent / RUN_RECORD).read_text())
    assert record["run_id"] == run.info.run_id and record["status"] == "FINISHED"


def test_sigterm_during_startup_ends_the_run_killed_and_the_next_job_continues_it(
    tmp_path, tiny_overrides
):
    extra = ("training.max_steps=4",)
    rc, out = signal_job_when(tmp_path, tiny_overrides, "not found: generating", *extra)
    assert rc == STOPPED_EXIT_CODE, out[-3000:]
    assert "during start-up" in out and "step 1/" not in out and "Traceback" not in out
    run_dir = tmp_path / "runs" / "o8_l2-tiny"
    assert not (run_dir / "checkpoint.pt").exists()
    datasets = tmp_path / "datasets"
    assert not [p.name for p in datasets.iterdir() if ".tmp-" in p.name], "no half-written store"
    client, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags[END_REASON_TAG] == "stopped by SIGTERM during start-up"
    assert run.data.tags[STOP_SIGNAL_TAG] == "SIGTERM"

    rc, out = run_job(tmp_path, tiny_overrides, *extra)
    assert rc == 0, out[-3000:]
    client, (again,) = mlflow_runs(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["squall.attempts"] == "2"
    assert steps(client, again) == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_chunk_stops_the_job_in_one_line_before_training(tmp_path, tiny_overrides,
                                                                 tiny_cfg, damage):  # fmt: skip
    from squall.data.setup import ensure_dataset

    path = ensure_dataset(tiny_cfg())
    chunk = path / "data" / "12.0.0.0"  # a training time (0..39)
    if damage == "delete":
        chunk.unlink()
    else:
        raw = chunk.read_bytes()
        chunk.write_bytes(raw[: len(raw) // 3])
    rc, out = run_job(tmp_path, tiny_overrides, "training.max_steps=4", "data.num_workers=1")
    assert rc == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: dataset " + str(path)), last
    assert "time 12 (2020-01-04T00:00:00)" in last
    assert ("1 of 40 chunks missing" if damage == "delete" else "1 unreadable") in last
    assert "Traceback" not in out and "step 1/" not in out
    assert not (tmp_path / "runs" / "o8_l2-tiny" / "checkpoint.pt").exists()
    client, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags[END_REASON_TAG].startswith("failed: DataError: dataset ")
