"""What a run ran on: versions, GPUs, host, code revision and Slurm job, recorded with every run."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

#: Facts of the Slurm job a process runs in: key in :func:`slurm_facts` and the variables that
#: give it, first set wins (``SLURM_JOB_NODELIST`` is the job's, not an srun step's, node list).
SLURM_VARIABLES = {
    "slurm_job_id": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "slurm_array_job_id": ("SLURM_ARRAY_JOB_ID",),
    "slurm_array_task_id": ("SLURM_ARRAY_TASK_ID",),
    "slurm_nodelist": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "slurm_num_nodes": ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"),
    "slurm_partition": ("SLURM_JOB_PARTITION",),
    "slurm_cluster": ("SLURM_CLUSTER_NAME",),
    "slurm_restart_count": ("SLURM_RESTART_COUNT",),
}


def git_revision(path: str | Path | None = None) -> tuple[str, bool | None]:
    """Commit of the checkout holding ``path`` and whether tracked files differ from it.

    ``SQUALL_GIT_SHA`` overrides it, for clusters that receive a copy of the code without ``.git``.

    Parameters
    ----------
    path : str or Path, optional
        A file or directory in the checkout; squall's own source by default.

    Returns
    -------
    sha : str
        Full commit hash, or ``"unknown"`` outside a git checkout.
    dirty : bool or None
        True when tracked files are modified; None when unknown.
    """
    if os.environ.get("SQUALL_GIT_SHA"):
        return os.environ["SQUALL_GIT_SHA"], None
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    if where.is_file():
        where = where.parent

    def git(*args: str) -> str:
        # git answers in milliseconds; 10 s only bounds a hung network file system.
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return sha, dirty


def slurm_facts(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Slurm job this process runs in, from Slurm's variables; empty outside a job.

    Parameters
    ----------
    environ : mapping, optional
        Variables to read; ``os.environ`` when omitted.

    Returns
    -------
    dict
        Keys of :data:`SLURM_VARIABLES` that Slurm set: job id (of this array task, if one),
        array job and task id (arrays only), compressed node list and node count, partition,
        cluster, and the restart count (``"0"`` on the first start; Slurm sets the variable only
        after a requeue).
    """
    env = os.environ if environ is None else environ
    if not any(name in env for name in SLURM_VARIABLES["slurm_job_id"]):
        return {}
    facts = {}
    for key, names in SLURM_VARIABLES.items():
        value = next((env[n] for n in names if env.get(n)), None)
        if value is not None:
            facts[key] = value
    facts.setdefault("slurm_restart_count", "0")
    return facts


def collect_environment() -> dict[str, str]:
    """Versions, hardware and code revision of this process, as strings for tags and params.

    Returns
    -------
    dict
        Keys ``python``, ``torch``, ``triton``, ``cuda``, ``nccl``, ``gpu_name``, ``gpu_count``,
        ``hostname``, ``platform``, ``git_sha``, ``git_dirty``. Components that are absent read
        ``"none"``; ``gpu_count`` counts the GPUs visible to this process. Inside a Slurm job,
        also the keys of :func:`slurm_facts` (job id, array ids, node list, partition, restart
        count), so that a run names the job, and the attempt, that recorded it.
    """
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    cuda = torch.cuda.is_available()
    nccl = "none"
    if cuda and torch.distributed.is_nccl_available():
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    sha, dirty = git_revision()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "nccl": nccl,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else "none",
        "gpu_count": str(torch.cuda.device_count() if cuda else 0),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "git_sha": sha,
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        **slurm_facts(),
    }
