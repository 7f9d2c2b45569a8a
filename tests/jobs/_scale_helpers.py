"""Helpers of the scaling-job tests: config composition, a tiny fast problem, running jobs.scale.

Imported by the test modules of this directory (pytest puts it on sys.path); a unique name so it
clashes with no other test directory's module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]
CONF = str(REPO / "conf")
CLUSTERS = ("local", "local_slurm", "h100", "h200")
EXPERIMENTS = ("strong_scaling", "weak_scaling", "kernel_compare", "partition_compare")

# O8 grid + level-2 mesh, 60 synthetic times, a 16-channel model: a point builds in a few seconds
# and one step takes milliseconds on 2 cores, so a point's time is mostly process start-up.
TINY = [
    "graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
    "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
    "data.train.start=0", "data.train.end=39", "data.validation.start=40", "data.validation.end=59",
    "data.test.start=40", "data.test.end=59", "model.num_channels=16", "model.num_heads=2",
    "scale.warmup_steps=1", "scale.steps=3", "scale.comm_repeats=2",
]  # fmt: skip
# A whole local sweep of 2 to 4 tiny points: process start-up (torch, mlflow) dominates.
SWEEP_TIMEOUT_S = 400


def compose_scale(*overrides: str, hydra: bool = False):
    """Compose conf/scale.yaml as jobs/scale.py would (``hydra=True`` keeps the hydra node)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("scale", overrides=list(overrides), return_hydra_config=hydra)


def run_scale(args: list[str], cache: Path, timeout: float = SWEEP_TIMEOUT_S,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m jobs.scale ARGS`` in the repository, with its cache (graphs, data, MLflow)."""
    full = dict(os.environ, SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1", **(env or {}))
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "jobs.scale", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


def start_scale(args: list[str], cache: Path, env: dict | None = None,
                **popen) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m jobs.scale ARGS`` in the background; its output goes to a file (also
    returned) so that a test can watch it while injecting a fault."""
    full = dict(os.environ, SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1", **(env or {}))
    full.pop("MLFLOW_TRACKING_URI", None)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A test run started in the background (``cmd &``) hands its children SIGINT ignored; the
        # driver stands for one a user runs in a terminal, where Ctrl-C interrupts it.
        popen.setdefault("preexec_fn", lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = cache / f"scale-{len(list(cache.glob('scale-*.log')))}.log"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.scale", *args], cwd=REPO, env=full,
                                stdout=f, stderr=subprocess.STDOUT, **popen)
    return proc, out


def sweep_state(stdout: str):
    """The SweepState of the sweep whose driver printed ``stdout``."""
    import re

    from squall.scaling.sweep import SweepState

    found = re.search(r"^sweep \S+: points in (\S+), runs in", stdout, re.M)
    assert found, stdout[-3000:]
    return SweepState.load(found.group(1))


def table_rows(stdout: str) -> list[list[str]]:
    """Cells of the printed scaling table, header row excluded."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


def table(stdout: str) -> list[dict[str, str]]:
    """The printed scaling table as one dict per row, by column header."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, row, strict=True)) for row in table_rows(stdout)]


def submitted_jobs(stdout: str) -> dict[int, str]:
    """Hydra job number -> Slurm job id, from the driver's "point #N submitted as job ID"."""
    import re

    return {int(n): j for n, j in re.findall(r"point #(\d+) submitted as job (\S+)", stdout)}


def sacct(job_id: str) -> list[tuple[str, str, str, str, str]]:
    """Every allocation of ``job_id`` in accounting: (state, exit code, nodes, start, end)."""
    done = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id.split("_")[0],
                           "-o", "JobID,State,ExitCode,NodeList,Start,End"],
                          capture_output=True, text=True, check=True, timeout=60)
    rows = [ln.split("|") for ln in done.stdout.splitlines()]
    return [tuple(r[1:]) for r in rows if r[0] == job_id]


def slurm_node() -> str:
    """The local Slurm's one node (``hostname -s``, as .ci/slurm/start.sh names it)."""
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True,
                          check=True).stdout.strip()
