"""A whole scaling sweep (``python -m jobs.scale --multirun``, local launcher) whose tracking
server is killed while the first point runs and started again later: the sweep must finish, with
its table and report, every point FINISHED and every timed step recorded exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from squall.scaling.sweep import STATE_FILE, SweepState
from squall.tracking.buffer import find_journals
from squall.tracking.logger import DRAIN_TIMEOUT_S

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "jobs"))
from _scale_helpers import SWEEP_TIMEOUT_S, TINY  # noqa: E402

STEPS = 30  # timed steps per point: enough for the outage to fall among them
#: The outage: from the first point's run turning RUNNING until this long after, plus the
#: server's own start-up (8 to 11 s on 2 cores, RECIPE.md).
OUTAGE_S = 20.0
#: Each point may wait for its journal at its end (logger.DRAIN_TIMEOUT_S), the outage and the
#: server's restart (90 s at most, conftest) come on top of a sweep's usual time.
TIMEOUT_S = SWEEP_TIMEOUT_S + 2 * DRAIN_TIMEOUT_S + OUTAGE_S + 90


def test_sweep_finishes_through_a_tracking_outage(restartable_mlflow_server, tmp_path):
    server = restartable_mlflow_server
    tiny = [o for o in TINY if not o.startswith("scale.steps=")]
    args = ["--multirun", *tiny, f"scale.steps={STEPS}", f"tracking.uri={server.url}",
            "tracking.experiment=outage-sweep", "parallel.gpus=1,2"]
    env = dict(os.environ, SQUALL_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.scale", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    client = MlflowClient(tracking_uri=server.url)
    try:
        # Wait for the first point's run to be RUNNING, then kill the server.
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            found = list((tmp_path / "sweeps").glob(f"*/{STATE_FILE}"))
            if found:
                points = json.loads(found[0].read_text()).get("points", {})
                if "0" in points and client.get_run(points["0"]).info.status == "RUNNING":
                    break
            time.sleep(0.3)
        server.stop()
        time.sleep(OUTAGE_S)
        server.start()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    state = SweepState.load(found[0].parent)

    # The outage reached the points: one of them said so in its log.
    logs = "".join(p.read_text(errors="replace") for p in Path(state.sweep_dir).rglob("*.err"))
    logs += "".join(p.read_text(errors="replace") for p in Path(state.sweep_dir).rglob("*.out"))
    assert "unavailable" in logs or "unreachable" in logs, logs[-3000:]

    rows = [ln for ln in out.splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 2 and all("FINISHED" in r for r in rows), out[-3000:]
    parent = client.get_run(state.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(state.parent_run_id, "report")} >= {
        "report/scaling.md", "report/scaling.csv"}
    for job in ("0", "1"):
        run = client.get_run(state.points[job])
        assert run.info.status == "FINISHED", job
        assert "squall.failure_reason" not in run.data.tags
        history = client.get_metric_history(state.points[job], "time/last_step_s")
        # Warm-up (1 step) and the timed steps, each exactly once, in order.
        assert [m.step for m in history] == list(range(1, STEPS + 2)), job
    assert find_journals(state.sweep_dir) == []  # everything sent, nothing left behind
