"""Where this process sits in a distributed job, and torch.distributed set-up from it.

:func:`dist_env` reads the launcher's environment variables into a frozen :class:`DistEnv`, in
this order of precedence:

1. torchrun (``TORCHELASTIC_RUN_ID``, or ``RANK`` and ``WORLD_SIZE``): ``RANK``, ``LOCAL_RANK``,
   ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
2. submitit's local executor (``SUBMITIT_EXECUTOR=local``): ``SUBMITIT_LOCAL_*``.
3. Slurm, inside an ``srun`` step (``SLURM_PROCID``; submitit's Slurm executor runs one): the
   step's variables (``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``, ...) where set, else the
   job's (``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``, ...). The master is the first host of the
   node list; its port is ``MASTER_PORT`` if set, else derived from the job id (:data:`PORT_BASE`).
4. Nothing of the above: a single process.

Rendezvous (``DistEnv.init_method``): torchrun's own store (``env://``); a ``file://`` store in
the temporary directory when every rank is on this host, so nothing listens on the network; TCP at
``master_addr:master_port`` across nodes. One process needs no rendezvous at all.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from squall.errors import SquallError

#: Ports derived from a job id lie in [PORT_BASE, PORT_BASE + PORT_SPAN): above the ports of
#: common services and below Linux's ephemeral range (32768-60999), so that no outgoing
#: connection holds them. Two jobs on one node collide only if their ids agree modulo PORT_SPAN.
PORT_BASE = 20000
PORT_SPAN = 10000

BACKENDS = ("nccl", "gloo")


class DistEnvError(SquallError):
    """Launcher environment variables are missing, malformed or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Position of this process in a distributed job.

    Attributes
    ----------
    rank, world_size : int
        Global rank in ``[0, world_size)`` and number of processes.
    local_rank, local_world_size : int
        Rank among the processes of this node and their number; ``local_rank`` picks the GPU.
    node_rank, num_nodes : int
        Index of this node in ``[0, num_nodes)`` and number of nodes.
    master_addr : str
        Host of rank 0.
    master_port : int
        Port of the TCP rendezvous on ``master_addr`` (used when ``init_method`` is ``tcp://``).
    backend : str
        ``"nccl"`` or ``"gloo"``.
    source : str
        Where the values came from: ``"torchrun"``, ``"submitit-local"``, ``"slurm"`` or
        ``"single"``.
    init_method : str
        Rendezvous URL for :func:`torch.distributed.init_process_group`, empty for one process.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = PORT_BASE
    backend: str = "gloo"
    source: str = "single"
    init_method: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            problems.append(f"rank={self.rank} not in [0, world_size={self.world_size})")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            problems.append(
                f"local_rank={self.local_rank} not in [0, local_world_size={self.local_world_size})"
            )
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            problems.append(f"node_rank={self.node_rank} not in [0, num_nodes={self.num_nodes})")
        if self.local_world_size > self.world_size or self.num_nodes > self.world_size:
            problems.append(
                f"local_world_size={self.local_world_size} or num_nodes={self.num_nodes} "
                f"exceeds world_size={self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            problems.append(f"master_port={self.master_port} not in [1, 65535]")
        if self.backend not in BACKENDS:
            problems.append(f"backend={self.backend!r} not one of {BACKENDS}")
        if problems:
            raise DistEnvError(f"inconsistent {self.source} environment: " + "; ".join(problems))

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0, the one that logs run-level results."""
        return self.rank == 0


def expand_hostlist(hostlist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm compressed host list, like ``scontrol show hostnames`` does.

    Parameters
    ----------
    hostlist : str
        For example ``"gpu[001-003,007],login-a[1-2]b"`` or ``"n1,n2"``. Several bracket groups in
        one name expand to their product (``"r[1-2]n[1-2]"`` gives r1n1, r1n2, r2n1, r2n2).
    name : str
        Variable the list came from, named in errors.

    Returns
    -------
    list of str
        Host names in order; zero padding of a range is kept (``001``).

    Raises
    ------
    DistEnvError
        On unbalanced brackets, an empty list or a malformed or reversed range.
    """
    names: list[str] = []
    for pattern in _split_top_level(hostlist, name):
        pieces = re.split(r"\[([^\[\]]*)\]", pattern)
        if "[" in "".join(pieces[::2]) or "]" in "".join(pieces[::2]):
            raise DistEnvError(f"{name}={hostlist!r}: unbalanced brackets in {pattern!r}")
        choices = [
            [p] if i % 2 == 0 else _expand_ranges(p, hostlist, name) for i, p in enumerate(pieces)
        ]
        names.extend("".join(parts) for parts in itertools.product(*choices))
    return names


def _split_top_level(hostlist: str, name: str) -> list[str]:
    """Split at commas outside brackets; reject empty entries."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise DistEnvError(f"{name}={hostlist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(hostlist[start:i])
            start = i + 1
    parts.append(hostlist[start:])
    if depth != 0 or any(not p.strip() for p in parts):
        raise DistEnvError(f"{name}={hostlist!r}: empty host or unbalanced brackets")
    return [p.strip() for p in parts]


def _expand_ranges(spec: str, hostlist: str, name: str) -> list[str]:
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise DistEnvError(f"{name}={hostlist!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise DistEnvError(f"{name}={hostlist!r}: reversed range {item!r}")
        out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return out


def expand_tasks_per_node(spec: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand Slurm's tasks-per-node notation, e.g. ``"2(x3),1"`` to ``[2, 2, 2, 1]``.

    Raises
    ------
    DistEnvError
        If an entry is not ``N`` or ``N(xM)``.
    """
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise DistEnvError(f"{name}={spec!r}: expected entries like 4 or 4(x2)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def port_from_job_id(job_id: str | int, name: str = "SLURM_JOB_ID") -> int:
    """Rendezvous port for a job: ``PORT_BASE + job_id % PORT_SPAN`` (range in :data:`PORT_BASE`).

    Array tasks (``"123_4"``) and step suffixes (``"123.0"``) use their leading digits.
    """
    m = re.match(r"\d+", str(job_id))
    if not m:
        raise DistEnvError(f"{name}={job_id!r} is not a job id")
    return PORT_BASE + int(m.group()) % PORT_SPAN


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def dist_env(environ: Mapping[str, str] | None = None, backend: str | None = None) -> DistEnv:
    """Read this process's :class:`DistEnv` from the launcher's environment variables.

    Parameters
    ----------
    environ : mapping, optional
        Variables to read; ``os.environ`` when omitted.
    backend : {"nccl", "gloo"}, optional
        Overrides :func:`default_backend`.

    Returns
    -------
    DistEnv
        See the module docstring for the launchers recognised and their precedence.

    Raises
    ------
    DistEnvError
        If a variable is missing, not an integer, or inconsistent with the others; the message
        names the variables.
    """
    env = os.environ if environ is None else environ
    backend = backend or default_backend()
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env):
        return _from_torchrun(env, backend)
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        return _from_submitit_local(env, backend)
    if "SLURM_PROCID" in env:
        return _from_slurm(env, backend)
    return DistEnv(backend=backend)


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """Integer value of the first variable of ``names`` that is set."""
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise DistEnvError(f"{name}={env[name]!r} is not an integer") from None
    if default is None:
        raise DistEnvError(f"{' or '.join(names)} is not set")
    return default


def _file_store(key: str) -> str:
    """``file://`` URL unique to one launch, shared by the ranks of one host."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
    name = f"squall-rendezvous-{os.getuid()}-{safe}"  # per user: /tmp's sticky bit
    return "file://" + os.path.join(tempfile.gettempdir(), name)


def _short_hash(text: str) -> str:
    """12 hex digits identifying ``text`` (keeps file names short)."""
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _init_method(num_nodes: int, world_size: int, addr: str, port: int, key: str) -> str:
    if world_size == 1:
        return ""
    if num_nodes == 1:
        return _file_store(key)
    return f"tcp://{addr}:{port}"


def _from_torchrun(env: Mapping[str, str], backend: str) -> DistEnv:
    missing = [
        n
        for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if n not in env
    ]
    if missing:
        raise DistEnvError(f"torchrun environment incomplete: {', '.join(missing)} not set")
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
    if world % local_world:
        raise DistEnvError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}"
        )
    return DistEnv(
        rank=_int(env, "RANK"),
        local_rank=_int(env, "LOCAL_RANK"),
        world_size=world,
        local_world_size=local_world,
        node_rank=_int(env, "GROUP_RANK", default=0),
        num_nodes=world // local_world,
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT"),
        backend=backend,
        source="torchrun",
        init_method="env://",
    )


def _from_submitit_local(env: Mapping[str, str], backend: str) -> DistEnv:
    world = _int(env, "SUBMITIT_LOCAL_NTASKS")
    job_id = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
    port = _int(env, "MASTER_PORT", default=port_from_job_id(job_id, "SUBMITIT_LOCAL_JOB_ID"))
    return DistEnv(
        rank=_int(env, "SUBMITIT_LOCAL_GLOBALID"),
        local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID"),
        world_size=world,
        local_world_size=world,  # the local executor runs every task on this host
        node_rank=_int(env, "SUBMITIT_LOCAL_NODEID", default=0),
        num_nodes=_int(env, "SUBMITIT_LOCAL_JOB_NUM_NODES", default=1),
        master_addr="127.0.0.1",
        master_port=port,
        backend=backend,
        source="submitit-local",
        # The job id is the controller's pid, so the job's folder is part of the key too.
        init_method=_init_method(
            1,
            world,
            "127.0.0.1",
            port,
            f"submitit-{job_id}-{_short_hash(env.get('SUBMITIT_FOLDER', ''))}",
        ),
    )


def _from_slurm(env: Mapping[str, str], backend: str) -> DistEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    if "SLURM_STEP_ID" not in env:
        # The batch script itself (Slurm sets SLURM_PROCID=0 there too): one process only.
        if world > 1:
            raise DistEnvError(
                f"SLURM_NTASKS={world} but this process is the batch script, not an srun task "
                "(SLURM_STEP_ID is not set): start it with srun, one task per GPU"
            )
        return DistEnv(backend=backend, source="slurm")
    node_rank = _int(env, "SLURM_NODEID", default=0)
    list_name = next(
        (n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if n in env),
        None,
    )
    if list_name is None:
        raise DistEnvError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not")
    hosts = expand_hostlist(env[list_name], list_name)
    num_nodes = _int(
        env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=len(hosts)
    )
    if num_nodes != len(hosts):
        raise DistEnvError(
            f"{list_name}={env[list_name]!r} names {len(hosts)} hosts but the job has "
            f"{num_nodes} nodes (SLURM_STEP_NUM_NODES/SLURM_JOB_NUM_NODES)"
        )
    tpn_name = next(
        (n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None
    )
    if tpn_name is not None:
        per_node = expand_tasks_per_node(env[tpn_name], tpn_name)
        if len(per_node) != num_nodes or sum(per_node) != world:
            raise DistEnvError(
                f"{tpn_name}={env[tpn_name]!r} does not give {world} tasks "
                f"(SLURM_NTASKS) over {num_nodes} nodes"
            )
        if not 0 <= node_rank < num_nodes:
            raise DistEnvError(f"SLURM_NODEID={node_rank} not in [0, {num_nodes})")
        local_world = per_node[node_rank]
    elif world % num_nodes:
        raise DistEnvError(
            f"SLURM_NTASKS={world} does not split evenly over {num_nodes} nodes "
            "and SLURM_TASKS_PER_NODE is not set"
        )
    else:
        local_world = world // num_nodes
    job_id = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0"))
    port = _int(env, "MASTER_PORT", default=port_from_job_id(job_id))
    addr = env.get("MASTER_ADDR", hosts[0])
    # A stale file (a killed run) must never be reused: a requeued job keeps its id, so the key
    # holds the restart count, and ids restart when a cluster's state is wiped, so it holds the
    # port of this step's srun too (shared by the step's tasks, new for each step).
    key = (
        f"slurm-{job_id}.{env.get('SLURM_STEP_ID', 'x')}.{env.get('SLURM_RESTART_COUNT', '0')}"
        f".{env.get('SLURM_STEP_LAUNCHER_PORT', 'x')}"
    )
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        local_rank=_int(env, "SLURM_LOCALID", default=0),
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=addr,
        master_port=port,
        backend=backend,
        source="slurm",
        init_method=_init_method(num_nodes, world, addr, port, key),
    )


def init_distributed(env: DistEnv, timeout_s: float = 300.0) -> None:
    """Initialise the default torch.distributed process group for ``env``.

    With NCCL, the CUDA device is set to ``env.local_rank`` first. With gloo on one node,
    ``GLOO_SOCKET_IFNAME`` defaults to the loopback interface so ranks talk over 127.0.0.1 only.
    One process gets a group of one (an in-memory store, no network), so collectives work alike.

    Parameters
    ----------
    env : DistEnv
        From :func:`dist_env`.
    timeout_s : float
        Rendezvous and collective timeout; 300 s covers slow starts of many ranks.

    Raises
    ------
    DistEnvError
        If NCCL is asked without a CUDA device for ``local_rank``, or a group of another shape
        is already initialised.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise DistEnvError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) is already "
                f"initialised; this environment asks for rank {env.rank} of {env.world_size}"
            )
        return
    if env.backend == "nccl":
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise DistEnvError(
                f"backend nccl needs a CUDA device for local_rank={env.local_rank}, this node "
                f"shows {count} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
            )
        torch.cuda.set_device(env.local_rank)
    elif env.num_nodes == 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1:
        dist.init_process_group(
            env.backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
        return
    dist.init_process_group(
        env.backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )


def destroy_distributed() -> None:
    """Tear down the default process group if one exists (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_sum_check(timeout_s: float = 60.0) -> tuple[DistEnv, int]:
    """Launch check, run as a job's function: join the group from the environment, sum ranks.

    Parameters
    ----------
    timeout_s : float
        Rendezvous timeout; a task that cannot reach its peers fails instead of hanging.

    Returns
    -------
    env : DistEnv
        What this task read from its launcher.
    total : int
        All-reduce (gloo) of every rank id: ``world_size * (world_size - 1) / 2`` when all went
        well.
    """
    import torch
    import torch.distributed as dist

    env = dist_env(backend="gloo")
    init_distributed(env, timeout_s=timeout_s)
    try:
        value = torch.tensor([env.rank], dtype=torch.int64)
        dist.all_reduce(value)
        return env, int(value.item())
    finally:
        destroy_distributed()
