"""Batch scripts: the one submitit renders for a cluster point (against a golden file) and the
hand-submitted wrappers in jobs/slurm (syntax, and one real run on the local Slurm)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _scale_helpers import REPO, TINY, compose_scale
from omegaconf import OmegaConf

from hydra_plugins.squall_scaling import SquallSlurmLauncher
from squall.scaling.plan import plan_point

GOLDEN = Path(__file__).with_name("golden")
# Rewrite the golden file after an intended change: SQUALL_UPDATE_GOLDEN=1 pytest tests/jobs
UPDATE = os.environ.get("SQUALL_UPDATE_GOLDEN") == "1"
# Two tiny CPU ranks: start-up of two Python processes with torch dominates (~20 s on 2 cores).
HAND_JOB_DEADLINE_S = 240


def render(cluster: str, gpus: int, *extra: str) -> str:
    cfg = compose_scale(f"cluster={cluster}", f"parallel.gpus={gpus}", "cluster.partition=gpu",
                        "cluster.account=myproject", "hydra.sweep.dir=/scratch/sweeps/s1", *extra,
                        hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    text = SquallSlurmLauncher(**params).sbatch_script(plan_point(cfg), True, f"scale-{gpus}g")
    return text.replace(sys.executable, "PYTHON")


@pytest.mark.parametrize("cluster, gpus", [("h100", 16), ("h200", 4)])
def test_rendered_point_script_matches_golden(cluster, gpus, monkeypatch):
    monkeypatch.setenv("SQUALL_VENV", "/opt/squall/.venv")
    text = render(cluster, gpus)
    golden = GOLDEN / f"{cluster}_{gpus}gpus.sbatch"
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()
    # What matters, spelled out: one task and one GPU per rank, the point's node count, the
    # requeue signal, and the set-up lines before srun.
    nodes = -(-gpus // 8)
    assert f"#SBATCH --nodes={nodes}\n" in text
    assert f"#SBATCH --ntasks-per-node={gpus // nodes}\n" in text
    assert f"#SBATCH --gpus-per-node={gpus // nodes}\n" in text
    assert "#SBATCH --signal=USR2@180\n" in text
    assert text.index("source /opt/squall/.venv/bin/activate") < text.index("srun ")


@pytest.mark.parametrize("script", ["scale.sbatch", "train.sbatch", "forecast.sbatch", "env.sh"])
def test_hand_wrappers_parse(script):
    path = REPO / "jobs" / "slurm" / script
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = path.read_text()
    if script.endswith(".sbatch"):
        assert "srun --kill-on-bad-exit=1" in text and "source jobs/slurm/env.sh" in text
        tasks = next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --ntasks-per-node"))
        gpus = next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --gpus-per-node"))
        assert tasks.split("=")[1] == gpus.split("=")[1]  # one task per GPU


@pytest.mark.slurm
def test_scale_wrapper_runs_a_point_on_local_slurm(local_slurm, tmp_path):
    # The wrapper as a user submits it, on CPU: two tasks, no GPU, the tiny problem.
    for name in ("jobs", "conf", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    env = dict(os.environ, SQUALL_CLUSTER="local", SQUALL_CACHE=str(tmp_path / "cache"),
               SLURM_CONF=str(local_slurm.conf))
    env.pop("MLFLOW_TRACKING_URI", None)
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--partition={local_slurm.partition}", "--gpus-per-node=0",
         "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G", "--time=5",
         str(REPO / "jobs" / "slurm" / "scale.sbatch"), *TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job_id = submit.stdout.strip().split(";")[0]
    end = time.monotonic() + HAND_JOB_DEADLINE_S
    while True:
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id],
                               capture_output=True, text=True, env=env).stdout.strip()
        if state and state not in ("PENDING", "RUNNING", "REQUEUED"):
            break
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} not done after {HAND_JOB_DEADLINE_S} s ({state})")
        time.sleep(2)
    out = (tmp_path / f"squall-scale-{job_id}.out").read_text()
    assert state == "COMPLETED", out[-3000:]
    points = [ln for ln in out.splitlines() if ln.startswith('{"point"')]
    assert len(points) == 1, out[-3000:]  # rank 0 alone prints the summary
    assert "point dp2:" in out
