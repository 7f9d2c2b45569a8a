"""Batch scripts: the one submitit renders for a cluster point (against a golden file) and the
hand-submitted wrappers in jobs/slurm (syntax, and one real run on the local Slurm)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _scale_helpers import REPO, TINY, compose_scale
from omegaconf import OmegaConf

from hydra_plugins.squall_scaling import SquallSlurmLauncher
from squall.distributed.env import rank_sum_check
from squall.errors import ConfigError
from squall.scaling.batch import make_executor
from squall.scaling.plan import plan_point

GOLDEN = Path(__file__).with_name("golden")
# Rewrite the golden file after an intended change: SQUALL_UPDATE_GOLDEN=1 pytest tests/jobs
UPDATE = os.environ.get("SQUALL_UPDATE_GOLDEN") == "1"
# Two tiny CPU ranks: start-up of two Python processes with torch dominates (~20 s on 2 cores).
HAND_JOB_DEADLINE_S = 240
# The interpreter of a submitting host that the compute nodes do not have: a script that names it
# runs on this machine only.
FAKE_SUBMIT_PYTHON = "/home/alice/laptop-venv/bin/python3.11"
VENV = "/opt/squall/.venv"


def launcher_for(cluster: str, *overrides: str) -> tuple[SquallSlurmLauncher, object]:
    """The Slurm launcher as Hydra sets it up for a sweep on ``cluster``, and the config."""
    cfg = compose_scale(f"cluster={cluster}", *overrides, hydra=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    launcher = SquallSlurmLauncher(**params)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    return launcher, cfg


def render(cluster: str, gpus: int, *extra: str) -> str:
    launcher, cfg = launcher_for(cluster, f"parallel.gpus={gpus}", "cluster.partition=gpu",
                                 "cluster.account=myproject", "hydra.sweep.dir=/scratch/sweeps/s1",
                                 *extra)
    return launcher.sbatch_script(plan_point(cfg), True, f"scale-{gpus}g")


def final_state(job_id: str, end: float, env: dict | None = None) -> str:
    """``State|ExitCode`` of a job once it has ended (sacct); scancel it at ``end``."""
    while True:
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State,ExitCode", "-j", job_id],
                               capture_output=True, text=True, env=env).stdout.strip()
        if state and state.split("|")[0] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return state
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} not done in time ({state})")
        time.sleep(1)


@pytest.fixture
def submit_host(monkeypatch):
    """This process posing as a submitting host whose interpreter the compute nodes lack."""
    monkeypatch.setenv("SQUALL_VENV", VENV)
    monkeypatch.setattr(sys, "executable", FAKE_SUBMIT_PYTHON)


GOLDEN_CASES = {
    # The network settings of a site with InfiniBand, exported in the script.
    ("h100", 16): ("cluster.env.NCCL_SOCKET_IFNAME=ib0", "cluster.env.NCCL_IB_HCA=mlx5"),
    ("h200", 4): (),
}


@pytest.mark.parametrize("cluster, gpus", list(GOLDEN_CASES))
def test_rendered_point_script_matches_golden(cluster, gpus, submit_host):
    text = render(cluster, gpus, *GOLDEN_CASES[cluster, gpus])
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
    assert text.index(f"source {VENV}/bin/activate") < text.index("srun ")


@pytest.mark.parametrize("cluster, gpus", list(GOLDEN_CASES))
def test_point_script_runs_the_configured_interpreter(cluster, gpus, submit_host):
    text = render(cluster, gpus, *GOLDEN_CASES[cluster, gpus])
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    assert f" {VENV}/bin/python -u -m submitit.core._submit " in srun
    # Neither the submitting host's interpreter nor anything of this machine's checkout.
    for here in (FAKE_SUBMIT_PYTHON, str(REPO), os.path.realpath(REPO / ".venv")):
        assert here not in text
    # Whole nodes, requeue allowed, a dead rank ends the step, each task on its own cores.
    assert "#SBATCH --exclusive\n" in text and "#SBATCH --requeue\n" in text
    for flag in ("--kill-on-bad-exit=1", "--cpus-per-task=12", "--cpu-bind=cores",
                 "--distribution=block:block"):
        assert f" {flag} " in srun
    # Every task must see all GPUs of its node: it takes GPU SLURM_LOCALID.
    assert "--gpu-bind" not in text and "--gpus-per-task" not in text


def test_network_settings_are_exported_after_setup_before_srun(submit_host):
    text = render("h100", 16, "cluster.env.NCCL_SOCKET_IFNAME='^lo,docker0'",
                  "cluster.env.NCCL_IB_HCA=mlx5_0:1", "+cluster.env.MASTER_PORT=29411")
    lines = text.splitlines()
    exports = [ln for ln in lines if ln.startswith("export ") and "SUBMITIT" not in ln]
    assert exports == ["export NCCL_SOCKET_IFNAME='^lo,docker0'", "export NCCL_IB_HCA=mlx5_0:1",
                       "export NCCL_DEBUG=WARN", "export MASTER_PORT=29411"]
    assert lines.index(f"source {VENV}/bin/activate") < lines.index(exports[0])
    assert lines.index(exports[-1]) < next(i for i, ln in enumerate(lines) if ln.startswith("srun"))
    # What bash makes of them: the values as configured.
    script = "\n".join(exports) + "\necho $NCCL_SOCKET_IFNAME $NCCL_IB_HCA $MASTER_PORT"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["^lo,docker0", "mlx5_0:1", "29411"]


def test_cluster_keys_change_the_script(submit_host):
    text = render("h200", 8, "cluster.exclusive=false", "cluster.python=python3",
                  "cluster.srun_args=['--mpi=pmix']")
    assert "--exclusive" not in text
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    assert " python3 -u -m submitit.core._submit " in srun
    assert srun.index("--kill-on-bad-exit=1") < srun.index("--mpi=pmix") < srun.index(" python3 ")
    # A site that must not requeue says so in the launcher config.
    text = render("h200", 8, "+hydra.launcher.additional_parameters.requeue=false")
    assert "#SBATCH --no-requeue\n" in text and "#SBATCH --requeue" not in text


@pytest.mark.parametrize("override, message", [
    ("cluster.python=null", "cluster.python=None (cluster=h100): set the interpreter"),
    ("cluster.exclusive=maybe", "cluster.exclusive='maybe': use true or false"),
    ("+cluster.env.NCCL-IB=1", "cluster.env.NCCL-IB: not a shell variable name"),
])
def test_bad_cluster_keys_are_one_line_errors(override, message, submit_host):
    with pytest.raises(ConfigError) as err:
        render("h100", 8, override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_local_cluster_defaults_to_this_interpreter(tmp_path):
    # The one cluster whose ranks are processes of this machine: no configured interpreter needed.
    executor = make_executor("local", {"submitit_folder": str(tmp_path)},
                             {"nodes": 1, "tasks_per_node": 2}, "scale",
                             {"name": "local", "python": None})
    assert executor._executor.python == shlex.quote(sys.executable)


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
        # A restart of the job (requeue) adds to its log instead of truncating it.
        assert "#SBATCH --open-mode=append\n" in text
        assert "--cpu-bind=cores" in text and '--cpus-per-task="${SLURM_CPUS_PER_TASK' in text
    if script in ("scale.sbatch", "train.sbatch"):
        assert "#SBATCH --requeue\n" in text and "run_requeueable srun" in text


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.slurm
def test_generated_script_runs_on_local_slurm(local_slurm, tmp_path):
    # The sweep's own executor for cluster=local_slurm, submitting a 2-rank rendezvous check. The
    # configured interpreter is a wrapper that records each task starting it, and the variable
    # the script exports.
    marker = tmp_path / "interpreter.log"
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/bash\necho "$SLURM_JOB_ID $SLURM_PROCID $SQUALL_PROBE" >> {marker}\n'
                      f'exec {REPO / ".venv" / "bin" / "python"} "$@"\n')
    python.chmod(0o755)
    launcher, _ = launcher_for("local_slurm", f"cluster.python={python}",
                               f"hydra.sweep.dir={tmp_path / 'sweep'}",
                               "+cluster.env.SQUALL_PROBE=exported")
    executor = launcher._executor({"nodes": 1, "tasks_per_node": 2}, "sbatch-check")
    job = executor.submit(rank_sum_check, 60.0)
    end = time.monotonic() + HAND_JOB_DEADLINE_S
    while not job.done():
        if time.monotonic() > end:
            subprocess.run(["scancel", job.job_id])
            pytest.fail(f"job {job.job_id} not done after {HAND_JOB_DEADLINE_S} s ({job.state})")
        time.sleep(2)
    script = job.paths.submission_file.read_text()
    assert "#SBATCH --exclusive" in script and f" {python} -u -m submitit" in script
    results = job.results()
    assert sorted((env.rank, total) for env, total in results) == [(0, 1), (1, 1)], job.stderr()
    assert sorted(marker.read_text().splitlines()) == [f"{job.job_id} {r} exported" for r in (0, 1)]
    # Slurm took the options: whole node, requeue allowed, the job ended well.
    show = subprocess.run(["scontrol", "-o", "show", "job", job.job_id], capture_output=True,
                          text=True, check=True).stdout
    assert "OverSubscribe=NO" in show and "Requeue=1" in show, show
    # The results are written before the batch script ends: wait for Slurm's own verdict.
    assert final_state(job.job_id, end) == "COMPLETED|0:0"
