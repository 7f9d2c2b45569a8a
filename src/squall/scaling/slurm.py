"""What Slurm says about a sweep's jobs: asked of ``squeue``, ``sacct`` and ``scontrol``.

The sweep driver never decides from a result file whether a point is over: a requeued job's first
attempt may have left one while Slurm runs the next. It asks Slurm (:func:`query_jobs`) and reads
results only once Slurm shows the job ended. Inside a job, :func:`stop_cause` tells why a stop
signal came (README, "Signals on Slurm"):

=============================  =================  ===========================================
signal                          sent by Slurm on   the point
=============================  =================  ===========================================
``SIGUSR2`` (``SIGUSR1``)       ``--signal`` some  checkpoints; submitit requeues the job once
                                time before the    per ``max_num_timeout``; the next attempt
                                time limit         resumes
``SIGTERM``, job requeued       ``scontrol         checkpoints and exits; Slurm has requeued
(``Restarts`` went up)          requeue``,         the job already (no second requeue); the
                                preemption         next attempt resumes
                                (REQUEUE mode)
``SIGTERM``, state PREEMPTED    preemption         checkpoints; submitit requeues the job
                                (CANCEL mode)
``SIGTERM``, state CANCELLED    ``scancel``        stops: the run ends KILLED with the reason,
                                                   the job CANCELLED, never requeued
``SIGTERM``, state TIMEOUT      the time limit     checkpoints and exits (job TIMEOUT)
                                itself
=============================  =================  ===========================================
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

#: Seconds a Slurm client command may take before it counts as failed (a loaded slurmctld
#: answers in well under a second; a minute means it is down).
COMMAND_TIMEOUT_S = 60

#: squeue states of a job that is not over (a requeued job passes through REQUEUED*).
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED",
          "RESV_DEL_HOLD", "SPECIAL_EXIT", "POWER_UP_NODE"}

#: Pending reasons that waiting does not clear: the job asks for more than its partition, QOS or
#: account allows, or for nodes that are down or do not exist. (``Resources``, ``Priority``,
#: ``Dependency``, ``BeginTime`` clear by themselves.)
UNSCHEDULABLE = {"PartitionConfig", "PartitionTimeLimit", "PartitionNodeLimit", "PartitionDown",
                 "PartitionInactive", "ReqNodeNotAvail", "NodeDown", "BadConstraints",
                 "InvalidAccount", "InvalidQOS", "JobHeldAdmin", "JobHeldUser",
                 "DependencyNeverSatisfied", "AssocMaxWallDurationPerJobLimit",
                 "AssocMaxNodesPerJobLimit", "AssocMaxCpuPerJobLimit", "QOSMaxWallDurationPerJobLimit",
                 "QOSMaxNodePerJobLimit", "QOSMaxCpuPerJobLimit", "QOSMaxMemoryPerJob",
                 "QOSMaxGRESPerJob", "MaxMemPerLimit", "InvalidPartition"}


class SlurmUnavailable(RuntimeError):
    """A Slurm client command is missing, failed or timed out."""


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmUnavailable(f"{args[0]} not found on PATH")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise SlurmUnavailable(f"{' '.join(args[:2])} timed out after {COMMAND_TIMEOUT_S} s") from err
    if check and done.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(args[:2])}: {done.stderr.strip() or done.returncode}")
    return done


# --- inside a job ---------------------------------------------------------------------------------

def job_id_from_env(env: dict | None = None) -> str | None:
    """This job's id as squeue/sacct print it: ``123_4`` for an array task, else ``123``."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def attempt_from_env(env: dict | None = None) -> dict[str, str]:
    """Where this attempt runs: job id, array index, node list (hostname outside Slurm), restart
    count (0 for the first attempt; Slurm counts requeues)."""
    env = os.environ if env is None else env
    return {"job_id": job_id_from_env(env) or "-",
            "array_index": env.get("SLURM_ARRAY_TASK_ID", "-"),
            "nodes": env.get("SLURM_JOB_NODELIST") or socket.gethostname(),
            "restarts": env.get("SLURM_RESTART_COUNT", "0")}


#: Causes of a stop, see the module docstring.
WARNING, REQUEUED, PREEMPTED, CANCELLED, TIMEOUT, UNKNOWN = (
    "time-limit warning", "requeued by Slurm", "preempted", "cancelled", "time limit", "stopped")
#: Accounting learns a cancel within a second (measured on the local Slurm: "CANCELLED by 0"
#: was visible to sacct in the job's own SIGTERM handler); a few tries cover a loaded slurmdbd
#: and stay far inside KillWait (30 s by default).
STATE_TRIES, STATE_WAIT_S = 4, 0.5


def stop_cause(signum: int, env: dict | None = None) -> str:
    """Why this Slurm job got ``signum`` (one of the causes above; UNKNOWN outside Slurm).

    ``SIGUSR1``/``SIGUSR2`` only come from ``--signal`` (the time-limit warning). ``SIGTERM``
    comes with every end: a requeue shows as ``Restarts`` above this attempt's
    ``SLURM_RESTART_COUNT`` (scontrol shows the job COMPLETING, so its state says nothing),
    the others as the job's state in accounting.
    """
    import signal

    env = os.environ if env is None else env
    job = job_id_from_env(env)
    if job is None:
        return UNKNOWN
    if signum in (signal.SIGUSR1, signal.SIGUSR2):
        return WARNING
    for attempt in range(STATE_TRIES):
        try:
            shown = _run(["scontrol", "-o", "show", "job", job]).stdout
            fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
            if int(fields.get("Restarts", "0")) > int(env.get("SLURM_RESTART_COUNT") or 0):
                return REQUEUED
            rows = _run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"]).stdout.splitlines()
        except (SlurmUnavailable, ValueError):
            rows = []
        state = rows[-1].strip() if rows else ""  # e.g. "CANCELLED by 1000"
        for prefix, cause in (("CANCELLED", CANCELLED), ("PREEMPTED", PREEMPTED),
                              ("TIMEOUT", TIMEOUT), ("REQUEUE", REQUEUED)):
            if state.startswith(prefix):
                return cause
        if attempt + 1 < STATE_TRIES:
            time.sleep(STATE_WAIT_S)
    return UNKNOWN


# --- the sweep driver -----------------------------------------------------------------------------

@dataclass
class JobInfo:
    """One job (array task) as Slurm sees it now.

    Attributes
    ----------
    state : str
        squeue's state while the job is known there, else accounting's (``CANCELLED by 0`` is
        cut to ``CANCELLED``).
    reason : str
        Pending reason (squeue) or accounting's reason.
    nodes : str
        Node list of the current (or last) attempt.
    exit_code : str
        ``code:signal`` from accounting, empty while running.
    active : bool
        The job is not over (pending, running, requeued, completing).
    """

    state: str
    reason: str = ""
    nodes: str = ""
    exit_code: str = ""
    active: bool = True


def _base(job_id: str) -> str:
    return job_id.split("_")[0]


def query_jobs(job_ids: list[str]) -> dict[str, JobInfo]:
    """State of each of ``job_ids`` (array tasks as ``123_4``); ids Slurm no longer knows (or
    does not know yet) are absent.

    squeue decides whether a job is over (it shows requeued jobs again as PENDING); accounting
    gives the end state, exit code and node list of jobs squeue has forgotten.
    """
    if not job_ids:
        return {}
    wanted = set(job_ids)
    bases = sorted({_base(j) for j in job_ids})
    out: dict[str, JobInfo] = {}
    done = _run(["sacct", "-X", "-n", "-P", "-j", ",".join(bases),
                 "-o", "JobID,State,ExitCode,Reason,NodeList"], check=False)
    for line in done.stdout.splitlines():  # the last line of a job is its latest attempt
        parts = line.split("|")
        if len(parts) == 5 and parts[0] in wanted:
            state = parts[1].split()[0] if parts[1] else ""
            out[parts[0]] = JobInfo(state=state, reason=parts[3], nodes=parts[4],
                                    exit_code=parts[2], active=state in ACTIVE)
    queue = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(bases),
                  "-o", "%i|%T|%r|%N"], check=False)
    for line in queue.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0] in wanted:
            known = out.get(parts[0])
            state = parts[1]
            if state in ACTIVE or known is None:
                out[parts[0]] = JobInfo(state=state, reason=parts[2], nodes=parts[3],
                                        exit_code=known.exit_code if known else "",
                                        active=state in ACTIVE)
            elif known.active:  # squeue saw the end before accounting did
                known.state, known.active = state, False
    return out


def job_attempts(job_id: str) -> list[dict[str, str]]:
    """Every allocation of ``job_id`` from accounting, oldest first: state (REQUEUED for one
    that Slurm requeued), exit code, node list, start and end."""
    done = _run(["sacct", "-X", "-D", "-n", "-P", "-j", _base(job_id),
                 "-o", "JobID,State,ExitCode,NodeList,Start,End"], check=False)
    rows = []
    for line in done.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 6 and parts[0] == job_id and parts[4] not in ("Unknown", "None"):
            rows.append(dict(zip(("job_id", "state", "exit_code", "nodes", "start", "end"),
                                 parts, strict=True)))
    return rows


def cancel(job_ids: list[str]) -> None:
    """``scancel`` the given jobs (array tasks or whole arrays); errors are ignored (a job may
    have ended in between)."""
    if job_ids:
        try:
            _run(["scancel", *job_ids], check=False)
        except SlurmUnavailable:
            pass
