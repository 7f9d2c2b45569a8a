"""DistEnv from torchrun, Slurm, submitit and nothing; torch.distributed initialised from it."""

from __future__ import annotations

import os
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from squall.distributed.env import (
    PORT_BASE,
    PORT_SPAN,
    DistEnv,
    destroy_distributed,
    dist_env,
    expand_hostlist,
    expand_tasks_per_node,
    init_distributed,
    port_from_job_id,
)
from squall.errors import SquallError


def slurm_step(**overrides: str) -> dict[str, str]:
    """Variables of task 5 of an srun step of 8 tasks on 2 nodes, as Slurm 22.05 sets them."""
    env = {
        "SLURM_JOB_ID": "123457",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_STEP_NODELIST": "gpu[007-008]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def test_single_process_default():
    env = dist_env({}, backend="gloo")
    assert env == DistEnv(backend="gloo", source="single")
    assert env.is_main and env.init_method == ""


def test_default_backend_follows_cuda():
    expected = "nccl" if torch.cuda.is_available() else "gloo"
    assert dist_env({}).backend == expected


def test_torchrun():
    env = dist_env({"TORCHELASTIC_RUN_ID": "x", "RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8",
                    "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "n1",
                    "MASTER_PORT": "29400"}, backend="gloo")
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (6, 2, 8, 4)
    assert (env.node_rank, env.num_nodes) == (1, 2)
    assert (env.master_addr, env.master_port) == ("n1", 29400)
    assert (env.source, env.init_method) == ("torchrun", "env://")


def test_torchrun_incomplete_names_missing_variables():
    with pytest.raises(SquallError, match="MASTER_ADDR, MASTER_PORT"):
        dist_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, backend="gloo")


def test_slurm_step_two_nodes():
    env = dist_env(slurm_step(), backend="gloo")
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert (env.node_rank, env.num_nodes) == (1, 2)
    assert env.master_addr == "gpu007"
    assert env.master_port == PORT_BASE + 123457 % PORT_SPAN == 23457
    assert env.init_method == "tcp://gpu007:23457"
    assert env.source == "slurm"


def test_slurm_uneven_tasks_per_node():
    env = dist_env(slurm_step(SLURM_STEP_NUM_TASKS="5", SLURM_NTASKS="5", SLURM_PROCID="4",
                              SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="4,1",
                              SLURM_TASKS_PER_NODE="4,1"), backend="gloo")
    assert (env.rank, env.world_size, env.local_world_size, env.node_rank) == (4, 5, 1, 1)


def test_slurm_job_variables_when_step_ones_absent():
    env = dist_env(slurm_step(SLURM_STEP_NUM_TASKS=None, SLURM_STEP_NODELIST=None,
                              SLURM_STEP_NUM_NODES=None, SLURM_STEP_TASKS_PER_NODE=None),
                   backend="gloo")
    assert (env.world_size, env.num_nodes, env.master_addr) == (8, 2, "gpu007")


def test_slurm_single_node_uses_a_file_rendezvous():
    env = dist_env(slurm_step(SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_PROCID="1",
                              SLURM_NODEID="0", SLURM_STEP_NODELIST="vm", SLURM_JOB_NODELIST="vm",
                              SLURM_STEP_NUM_NODES="1", SLURM_JOB_NUM_NODES="1",
                              SLURM_STEP_TASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2"),
                   backend="gloo")
    assert env.init_method.startswith("file://") and "123457" in env.init_method


def test_rendezvous_file_is_new_for_each_launch():
    one_node = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "vm",
                "SLURM_JOB_NODELIST": "vm", "SLURM_STEP_NUM_NODES": "1",
                "SLURM_JOB_NUM_NODES": "1", "SLURM_STEP_TASKS_PER_NODE": "2",
                "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_LAUNCHER_PORT": "40001"}

    def url(**changes):
        return dist_env(slurm_step(**{**one_node, **changes}), backend="gloo").init_method

    assert url() == url(SLURM_PROCID="1", SLURM_LOCALID="1")  # the step's tasks meet
    assert url(SLURM_RESTART_COUNT="1") != url()  # a requeued job
    assert url(SLURM_STEP_LAUNCHER_PORT="40002") != url()  # same id after a wiped state
    assert url(SLURM_STEP_ID="1") != url()


def test_master_port_and_addr_overrides():
    env = dist_env(slurm_step(MASTER_PORT="31111", MASTER_ADDR="10.0.0.1"), backend="gloo")
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 31111)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "8"}, "rank=8"),
        ({"SLURM_LOCALID": "4"}, "local_rank=4"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({"SLURM_STEP_NODELIST": "gpu[007-009]"}, "SLURM_STEP_NODELIST"),
        ({"SLURM_STEP_NODELIST": "gpu[007-"}, "SLURM_STEP_NODELIST"),
        ({"SLURM_STEP_TASKS_PER_NODE": "4x2"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID"),
        ({"MASTER_PORT": "70000"}, "master_port=70000"),
    ],
)
def test_slurm_inconsistent_variables_are_named(overrides, named):
    with pytest.raises(SquallError, match=named.replace("[", r"\[").replace("(", r"\(")):
        dist_env(slurm_step(**overrides), backend="gloo")


def test_slurm_batch_script_with_several_tasks_is_refused():
    with pytest.raises(SquallError, match="srun"):
        dist_env({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                  "SLURM_JOB_NODELIST": "vm"}, backend="gloo")
    one = dist_env({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                    "SLURM_JOB_NODELIST": "vm"}, backend="gloo")
    assert (one.world_size, one.source) == (1, "slurm")


def test_submitit_local():
    env = dist_env({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242",
                    "SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "2",
                    "SUBMITIT_LOCAL_NTASKS": "3", "SUBMITIT_LOCAL_NODEID": "0",
                    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}, backend="gloo")
    assert (env.rank, env.local_rank, env.world_size, env.num_nodes) == (2, 2, 3, 1)
    assert (env.master_addr, env.source) == ("127.0.0.1", "submitit-local")
    assert env.init_method.startswith("file://")


def test_unknown_backend():
    with pytest.raises(SquallError, match="backend='mpi'"):
        dist_env({}, backend="mpi")


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("vm", ["vm"]),
        ("n1,n2", ["n1", "n2"]),
        ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
        ("a[1-2]b,c", ["a1b", "a2b", "c"]),
        ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
        ("x[09-11]", ["x09", "x10", "x11"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "a,,b", "a[1-", "a]1[", "a[3-1]", "a[x]"])
def test_expand_hostlist_rejects(bad):
    with pytest.raises(SquallError, match="SLURM_JOB_NODELIST"):
        expand_hostlist(bad)


def test_tasks_per_node_and_port():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert port_from_job_id("123_4") == port_from_job_id(123) == PORT_BASE + 123
    assert PORT_BASE <= port_from_job_id(99999999) < PORT_BASE + PORT_SPAN


def test_single_process_group_of_one():
    init_distributed(DistEnv(backend="gloo"))
    try:
        value = torch.tensor([3.0])
        dist.all_reduce(value)
        assert dist.get_world_size() == 1 and value.item() == 3.0
    finally:
        destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # a second call is harmless


def _worker(rank: int, world: int, job_id: str, backend: str, out: dict) -> None:
    """One rank with the variables srun gives task ``rank`` of a one-node step."""
    os.environ.update({
        "SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(world),
        "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": str(world),
    })
    env = dist_env(backend=backend)
    init_distributed(env, timeout_s=60)
    try:
        device = torch.device("cuda") if env.backend == "nccl" else torch.device("cpu")
        value = torch.tensor([float(env.rank + 1)], device=device)
        dist.all_reduce(value)
        gathered = [torch.zeros(1, device=device) for _ in range(world)]
        dist.all_gather(gathered, torch.tensor([float(env.rank)], device=device))
        cuda_device = torch.cuda.current_device() if env.backend == "nccl" else None
        out[rank] = (env.rank, env.local_rank, env.world_size, value.item(),
                     [g.item() for g in gathered], cuda_device)
    finally:
        destroy_distributed()


def run_two_ranks(backend: str) -> dict:
    world = 2
    # Unique id: the rendezvous file is named after the job id.
    job_id = str(uuid.uuid4().int % 10**9)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, job_id, backend, out), nprocs=world, join=True)
        return dict(out)


def test_two_process_gloo_from_slurm_variables():
    assert run_two_ranks("gloo") == {
        0: (0, 0, 2, 3.0, [0.0, 1.0], None),
        1: (1, 1, 2, 3.0, [0.0, 1.0], None),
    }


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_process_nccl_sets_device_from_local_rank():
    assert run_two_ranks("nccl") == {
        0: (0, 0, 2, 3.0, [0.0, 1.0], 0),
        1: (1, 1, 2, 3.0, [0.0, 1.0], 1),
    }


def test_submitit_local_executor_two_tasks(tmp_path):
    # submitit's local executor really starts two tasks; each reads its DistEnv and all-reduces.
    import submitit

    from squall.distributed.env import rank_sum_check

    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=2)
    job = executor.submit(rank_sum_check)
    results = job.results()
    envs = sorted((env for env, _ in results), key=lambda e: e.rank)
    assert [(e.rank, e.local_rank, e.world_size, e.source) for e in envs] == [
        (0, 0, 2, "submitit-local"), (1, 1, 2, "submitit-local")]
    assert envs[0].init_method == envs[1].init_method != ""
    assert [total for _, total in results] == [1, 1]
