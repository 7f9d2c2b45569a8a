"""Real jobs through submitit on the local Slurm started by .ci/slurm/start.sh.

All jobs are submitted at once by one module fixture, so they run side by side on the node's
4 CPUs while the tests check them one after the other.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from squall.distributed.env import rank_sum_check

pytestmark = pytest.mark.slurm

# Job functions defined here must travel by value: the job cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Slurm enforces time limits (and sends --signal) on a 30 s sweep, then KillWait (5 s in
# slurm.conf); submitit waits 15 s for a result file after a job ends: 1 min limit + 30 + 5 + 15
# and a margin for a loaded machine.
TIMEOUT_JOB_DEADLINE_S = 180
# A job that ends quickly is seen by sacct within seconds; submitit adds its 15 s result wait.
QUICK_JOB_DEADLINE_S = 90


def kill_self() -> None:
    """Die outside Python, as an OOM kill or a segfault would: no result file is written."""
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_long() -> None:
    """Outlive any limit a test sets."""
    time.sleep(3600)


def wait_done(job: submitit.Job, deadline_s: float) -> str:
    """Poll Slurm (sacct) until ``job`` has ended there; fail instead of hanging past ``deadline_s``.

    ``job.done()`` alone is not enough: it turns true as soon as the job wrote its result file,
    while Slurm may still show the job RUNNING or COMPLETING for a moment.
    """
    end = time.monotonic() + deadline_s
    while True:
        state = job.watcher.get_state(job.job_id, mode="force")
        if job.watcher.is_done(job.job_id, mode="cache"):
            return state
        if time.monotonic() > end:
            pytest.fail(f"job {job.job_id} not done after {deadline_s} s (state {state})")
        time.sleep(2)


@pytest.fixture(scope="module")
def jobs(local_slurm, tmp_path_factory):
    """Submit every job of this module; cancel whatever still runs at the end."""
    folder = tmp_path_factory.mktemp("submitit") / "%j"

    def executor(**params):
        ex = submitit.SlurmExecutor(folder=folder, python=sys.executable)
        ex.update_parameters(partition=local_slurm.partition, nodes=1, cpus_per_task=1,
                             mem="1G", **params)
        return ex

    submitted = {
        "timeout": executor(ntasks_per_node=1, time=1).submit(sleep_long),
        "ranks": executor(ntasks_per_node=2, time=5).submit(rank_sum_check),
        "killed": executor(ntasks_per_node=1, time=5).submit(kill_self),
        "cancelled": executor(ntasks_per_node=1, time=5).submit(sleep_long),
    }
    yield submitted
    for job in submitted.values():
        if not job.done():
            job.cancel(check=False)


def test_two_task_job_all_reduces_over_gloo(jobs):
    job = jobs["ranks"]
    wait_done(job, QUICK_JOB_DEADLINE_S)
    results = job.results()
    assert len(results) == 2
    envs = sorted((r[0] for r in results), key=lambda e: e.rank)
    assert [e.rank for e in envs] == [0, 1]
    assert {(e.world_size, e.local_world_size, e.num_nodes, e.source) for e in envs} == {
        (2, 2, 1, "slurm")
    }
    assert envs[0].master_addr == subprocess.run(["hostname", "-s"], capture_output=True,
                                                 text=True).stdout.strip()
    assert [r[1] for r in results] == [1, 1]  # 0 + 1 on every rank


@pytest.mark.slow  # 15 s: waits for Slurm accounting
def test_killed_job_is_reported_failed(jobs):
    job = jobs["killed"]
    wait_done(job, QUICK_JOB_DEADLINE_S)
    assert job.state == "FAILED"
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="FAILED"):
        job.result()


@pytest.mark.slow  # 15 s: waits for Slurm accounting
def test_cancelled_job_is_reported_cancelled(jobs):
    job = jobs["cancelled"]
    end = time.monotonic() + QUICK_JOB_DEADLINE_S
    while job.state != "RUNNING" and time.monotonic() < end:
        time.sleep(1)
    job.cancel()
    wait_done(job, QUICK_JOB_DEADLINE_S)
    assert job.state.startswith("CANCELLED")
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()


def test_job_over_its_time_limit_is_reported_failed(jobs):
    # submitit asks Slurm for USR2 90 s before the limit (at once, for 1 min); a function that
    # is not Checkpointable then fails with "timed-out and not checkpointable". Were the signal
    # missed, Slurm would end the job as TIMEOUT. Either way: done and failed, never hung.
    job = jobs["timeout"]
    wait_done(job, TIMEOUT_JOB_DEADLINE_S)
    assert job.state in ("FAILED", "TIMEOUT")
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="timed-out|TIMEOUT"):
        job.result()


def listeners(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) listening on TCP ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_daemons_listen_on_loopback_only(local_slurm):
    conf = local_slurm.conf.read_text() + (local_slurm.conf.parent / "slurmdbd.conf").read_text()
    ports = [int(p) for p in re.findall(r"^(?:SlurmctldPort|SlurmdPort|DbdPort)=(\d+)", conf,
                                        re.MULTILINE)]
    assert len(ports) == 3
    for port in ports:
        assert listeners(port) == {"0100007F"}, f"port {port}"  # 127.0.0.1, little-endian hex
