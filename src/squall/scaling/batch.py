"""Batch scripts of scaling points: the cluster config turned into submitit's executor, in one place.

The sweep launchers (:mod:`squall.scaling.launcher`) submit every point through submitit. This
module builds that executor from the launcher config (``hydra.launcher``) and the cluster config
(``cluster.*``), and renders the batch script it would submit, so that a sweep and a dry run (or
a golden test, on a machine without Slurm) produce the same text.

What a Slurm cluster's script carries, and why:

``cluster.python`` as the interpreter
    The command that starts Python on the compute nodes: a venv's ``bin/python`` (made active by
    ``cluster.setup``), ``python3`` from a module loaded there, or a container's
    ``apptainer exec image.sif python``. Required on a Slurm cluster: the submitting host's
    ``sys.executable`` may not exist on the compute nodes, or be another build. The local
    cluster (every rank a process of this machine) defaults to this interpreter.
``#SBATCH --requeue``
    The job may be requeued (preemption, node failure, submitit's own requeue on the time-limit
    signal) and resumes from its checkpoint in the same MLflow run.
``#SBATCH --exclusive`` (``cluster.exclusive``, default true)
    Whole nodes: no other job shares a node while a point is timed.
``srun --kill-on-bad-exit=1``
    A rank that dies ends the step at once; the others would wait in a collective until the time
    limit.
``srun --cpus-per-task=N --cpu-bind=cores --distribution=block:block``
    Each task pinned to its own N cores, consecutive tasks on consecutive cores of one socket
    before the next: with ``cluster.cpus_per_gpu`` times the GPUs of a socket equal to the
    socket's usable cores (4 x 12 of 48 on the clusters configured here), tasks 0-3 run on the
    socket of GPUs 0-3. srun is given N itself: since Slurm 22.05 it no longer takes
    ``--cpus-per-task`` from the batch allocation.
GPUs
    ``--gpus-per-node`` equal to the tasks per node, one task per GPU, and no ``--gpu-bind`` or
    ``--gpus-per-task``: every task sees all GPUs of its node and takes GPU ``SLURM_LOCALID``
    (:func:`squall.distributed.env.init_distributed`). Binding a task to its GPU would renumber it
    ``cuda:0`` and the local rank would name a device the task cannot see.
``cluster.env``
    Exported after ``cluster.setup`` (the config wins over what a module sets): NCCL's network
    (``NCCL_SOCKET_IFNAME``, ``NCCL_IB_HCA``, ...) and anything else the site needs. A null value
    is not exported.
``cluster.srun_args``
    Further srun options of the site, after the ones above (``--mpi=pmix``, ...).

Rendezvous is not in the script: every task derives it in :mod:`squall.distributed.env`, the one
place for it (master: the first host of the step's node list; port: from the job id, so two jobs
on one node do not collide). ``MASTER_ADDR`` or ``MASTER_PORT`` in ``cluster.env`` override them.
"""

from __future__ import annotations

import functools
import logging
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squall.config import as_flag
from squall.errors import ConfigError

log = logging.getLogger(__name__)

#: srun options of every Slurm point (see the module docstring); ``--cpus-per-task`` is added
#: when the launcher sets it.
SRUN_ARGS = ("--kill-on-bad-exit=1", "--cpu-bind=cores", "--distribution=block:block")

#: Launcher keys that configure the executor itself rather than the job.
_INIT_KEYS = ("submitit_folder", "max_num_timeout")

#: submitit's generic parameter names and their Slurm names (``mem_gb`` is converted apart).
_SLURM_NAMES = {"timeout_min": "time", "tasks_per_node": "ntasks_per_node", "name": "job_name"}

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class BatchSettings:
    """What a cluster config asks of its points' batch scripts.

    Attributes
    ----------
    python : str
        Shell command starting the interpreter of every rank.
    exclusive : bool
        Whole nodes per job.
    env : tuple of (str, str)
        Variables exported before srun, in config order.
    srun_args : tuple of str
        Extra srun options of the site.
    """

    python: str
    exclusive: bool = True
    env: tuple[tuple[str, str], ...] = ()
    srun_args: tuple[str, ...] = ()


def batch_settings(cluster: Mapping[str, Any] | None, executor: str) -> BatchSettings:
    """Read and check the batch keys of a cluster config.

    Parameters
    ----------
    cluster : mapping or None
        The resolved ``cluster`` node: ``python``, ``exclusive``, ``env``, ``srun_args`` (all
        optional except ``python`` on Slurm).
    executor : {"slurm", "local"}
        submitit's executor: only ``"local"`` may fall back to this process's interpreter.

    Raises
    ------
    ConfigError
        ``cluster.python`` missing on Slurm, or a key of the wrong type.
    """
    cluster = dict(cluster or {})
    name = cluster.get("name", "?")
    python = cluster.get("python")
    if python is None and executor == "local":
        python = shlex.quote(sys.executable)
    if not isinstance(python, str) or not python.strip():
        raise ConfigError(
            f"cluster.python={python!r} (cluster={name}): set the interpreter of the compute "
            "nodes, e.g. cluster.python=/path/to/venv/bin/python or python3 from a module in "
            "cluster.setup")
    exclusive = as_flag(cluster.get("exclusive", executor == "slurm"), "cluster.exclusive")
    env_cfg = cluster.get("env") or {}
    if not isinstance(env_cfg, Mapping):
        raise ConfigError(f"cluster.env={env_cfg!r}: a mapping of variable names to values")
    env = []
    for key, value in env_cfg.items():
        if not _ENV_NAME.fullmatch(str(key)):
            raise ConfigError(f"cluster.env.{key}: not a shell variable name")
        if isinstance(value, (Mapping, list, tuple)):
            raise ConfigError(f"cluster.env.{key}={value!r}: a single value")
        if value is not None:
            env.append((str(key), str(value).lower() if isinstance(value, bool) else str(value)))
    srun_args = cluster.get("srun_args") or []
    if isinstance(srun_args, str) or not all(isinstance(a, str) for a in srun_args):
        raise ConfigError(f"cluster.srun_args={srun_args!r}: a list of srun options")
    return BatchSettings(python=python.strip(), exclusive=exclusive, env=tuple(env),
                         srun_args=tuple(srun_args))


def cluster_config(config: Any) -> dict[str, Any] | None:
    """The resolved ``cluster`` node of a launcher's config (None before Hydra set it up)."""
    from omegaconf import OmegaConf

    if config is None or "cluster" not in config:
        return None
    return OmegaConf.to_container(config.cluster, resolve=True)


def slurm_parameters(params: Mapping[str, Any], shape: Mapping[str, Any], name: str,
                     settings: BatchSettings) -> dict[str, Any]:
    """Parameters of submitit's ``SlurmExecutor`` for one point shape, in its own (Slurm) names.

    Parameters
    ----------
    params : mapping
        The launcher config (``hydra.launcher`` without ``_target_``), submitit's generic names
        (``timeout_min``, ``tasks_per_node``, ...) and Slurm ones (``partition``, ``setup``, ...).
    shape : mapping
        ``nodes``, ``tasks_per_node`` and, on GPUs, ``gpus_per_node`` of the point.
    name : str
        Job name.
    settings : BatchSettings
        From :func:`batch_settings`.
    """
    merged = {k: v for k, v in {**params, **shape, "name": name}.items()
              if k not in _INIT_KEYS and v is not None}
    out: dict[str, Any] = {}
    for key, value in merged.items():
        if key == "mem_gb":
            out["mem"] = f"{value}GB" if value == int(value) else f"{int(value * 1024)}MB"
        else:
            out[_SLURM_NAMES.get(key, key)] = value
    extra = dict(out.get("additional_parameters") or {})
    # Requeue unless the launcher config says otherwise (additional_parameters.requeue=false).
    requeue = as_flag(extra.pop("requeue", True), "hydra.launcher.additional_parameters.requeue")
    extra["requeue" if requeue else "no_requeue"] = True
    out["additional_parameters"] = extra
    if settings.exclusive:
        out["exclusive"] = True
    srun = list(SRUN_ARGS)
    if out.get("cpus_per_task"):
        srun.insert(1, f"--cpus-per-task={out['cpus_per_task']}")
    out["srun_args"] = srun + list(settings.srun_args)
    exports = [f"export {k}={shlex.quote(v)}" for k, v in settings.env]
    out["setup"] = list(out.get("setup") or []) + exports
    return out


def local_parameters(params: Mapping[str, Any], shape: Mapping[str, Any],
                     name: str) -> dict[str, Any]:
    """Parameters of submitit's ``AutoExecutor`` for the local executor (``local_`` prefixed
    where not generic)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    base = set(OmegaConf.structured(BaseQueueConf).keys())
    out = {k if k in base else f"local_{k}": v
           for k, v in params.items() if k not in _INIT_KEYS}
    out.update(shape, name=name)
    return out


def _check_interpreter(python: str) -> None:
    """Warn when a configured interpreter path does not exist here (often the compute nodes
    share the file system of the submitting host, so it is most likely missing there too)."""
    words = shlex.split(python)
    if len(words) == 1 and "/" in words[0] and not Path(words[0]).exists():
        log.warning("cluster.python=%s does not exist on this host (cwd %s); the batch script "
                    "runs it on the compute nodes", python, Path.cwd())


def make_executor(executor: str, params: Mapping[str, Any], shape: Mapping[str, Any], name: str,
                  cluster: Mapping[str, Any] | None, *, render_only: bool = False):
    """submitit executor for points of one shape.

    Parameters
    ----------
    executor : {"slurm", "local"}
        submitit's executor.
    params, shape, name
        See :func:`slurm_parameters`.
    cluster : mapping or None
        The resolved ``cluster`` config (see :func:`batch_settings`).
    render_only : bool
        Slurm only: an executor that can render its script but is never used to submit, so that
        it needs no ``srun`` on this machine.

    Raises
    ------
    ConfigError
        See :func:`batch_settings`.
    """
    import submitit

    settings = batch_settings(cluster, executor)
    folder = params["submitit_folder"]
    if executor == "local":
        init: dict[str, Any] = {"folder": folder, "local_python": settings.python}
        if "max_num_timeout" in params:
            init["local_max_num_timeout"] = params["max_num_timeout"]
        ex = submitit.AutoExecutor(cluster="local", **init)
        ex.update_parameters(**local_parameters(params, shape, name))
        return ex
    if executor != "slurm":
        raise ConfigError(f"no batch scripts for submitit executor {executor!r}")
    if not render_only:
        _check_interpreter(settings.python)
    cls = _script_only_class() if render_only else submitit.SlurmExecutor
    ex = cls(folder, max_num_timeout=params.get("max_num_timeout", 3), python=settings.python)
    ex.update_parameters(**slurm_parameters(params, shape, name, settings))
    return ex


def render_script(executor) -> str:
    """The batch script a ``SlurmExecutor`` submits for a single job (an array adds
    ``--array`` and ``%A_%a`` in the log names)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "uid")


@functools.cache
def _script_only_class():
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        """A SlurmExecutor for rendering only: available without ``srun`` on this machine."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    return ScriptOnlySlurmExecutor
