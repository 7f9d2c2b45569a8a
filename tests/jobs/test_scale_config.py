"""Composition of conf/scale.yaml for every cluster and experiment, point plans and bad layouts."""

from __future__ import annotations

import pytest
from _scale_helpers import CLUSTERS, EXPERIMENTS, compose_scale, run_scale
from omegaconf import OmegaConf

from squall.scaling.plan import LayoutError, plan_point

LAUNCHERS = {"local": "hydra_plugins.squall_scaling.SquallLocalLauncher",
             "h100": "hydra_plugins.squall_scaling.SquallSlurmLauncher",
             "h200": "hydra_plugins.squall_scaling.SquallSlurmLauncher",
             "local_slurm": "hydra_plugins.squall_scaling.SquallSlurmLauncher"}


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_cluster_and_experiment_composes(cluster, experiment):
    cfg = compose_scale(f"cluster={cluster}", f"experiment={experiment}",
                        "hydra.sweep.dir=/sweeps/x", hydra=True)
    assert cfg.hydra.launcher._target_ == LAUNCHERS[cluster]
    assert cfg.hydra.callbacks.scaling._target_ == "squall.scaling.sweep.SweepCallback"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert params, "an experiment sweeps something"
    assert cfg.cluster.name == cluster
    if experiment in ("strong_scaling", "weak_scaling"):
        assert params["parallel.gpus"] == cfg.cluster.scaling_gpus
        # Every world size the experiment sweeps on this cluster has a valid plan.
        for gpus in str(cfg.cluster.scaling_gpus).split(","):
            point = compose_scale(f"cluster={cluster}", f"experiment={experiment}",
                                  f"parallel.gpus={gpus}")
            plan = plan_point(point)
            assert plan.gpus == int(gpus) == plan.nodes * plan.tasks_per_node
            assert plan.tasks_per_node <= cfg.cluster.gpus_per_node
    if experiment == "kernel_compare":
        assert params["model.attention_backend"] == "torch,triton"
    if experiment == "partition_compare":
        point = compose_scale(f"cluster={cluster}", f"experiment={experiment}")
        assert point.parallel.model_parallel == point.parallel.gpus == 2
    if cluster in ("h100", "h200"):
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert launcher["timeout_min"] == cfg.cluster.time_min
        assert launcher["max_num_timeout"] >= 1  # requeue after a timeout or preemption
        assert launcher["cpus_per_task"] == cfg.cluster.cpus_per_gpu
        assert {"partition", "account", "qos", "setup"} <= set(launcher)
        assert cfg.training.device == "cuda" and cfg.cluster.backend == "nccl"
        assert cfg.hydra.job.env_set.OMP_NUM_THREADS == str(cfg.cluster.cpus_per_gpu)
    else:
        assert cfg.training.device == "cpu" and cfg.cluster.backend == "gloo"
        assert cfg.cluster.gpus_per_node == 2  # the CI machine's 2 cores
        assert cfg.hydra.job.env_set.OMP_NUM_THREADS == "1"


def test_strong_and_weak_scaling_batches():
    strong = plan_point(compose_scale("cluster=h100", "parallel.gpus=16"))
    assert (strong.nodes, strong.tasks_per_node, strong.data_parallel) == (2, 8, 16)
    assert (strong.batch_per_rank, strong.global_batch) == (2, 32)
    weak = plan_point(compose_scale("cluster=h100", "experiment=weak_scaling", "parallel.gpus=16"))
    assert (weak.batch_per_rank, weak.global_batch, weak.layout) == (1, 16, "dp16")


@pytest.mark.parametrize("overrides, message", [
    (["cluster=h100", "parallel.gpus=16", "parallel.nodes=1"],
     "16 GPUs per node (parallel.gpus=16 over 1 node(s)) but a h100 node has cluster.gpus_per_node=8"),
    (["parallel.gpus=3"], "parallel.gpus=3 does not split evenly over 2 nodes"),
    (["parallel.gpus=4"], "cluster local allows cluster.max_nodes=1"),
    (["cluster=h100", "parallel.gpus=6", "parallel.model_parallel=4"],
     "parallel.gpus=6 is not a multiple of parallel.model_parallel=4"),
    (["cluster=h100", "parallel.gpus=8", "parallel.data_parallel=3"],
     "parallel.data_parallel=3 x parallel.model_parallel=1 != parallel.gpus=8"),
    (["cluster=h100", "parallel.gpus=8", "scale.batch=12"],
     "global batch scale.batch=12 does not split over 8 data-parallel ranks"),
    (["parallel.gpus=0"], "parallel.gpus=0 must be a whole number >= 1"),
    (["scale.mode=sideways"], "scale.mode='sideways': choose one of strong, weak"),
    (["cluster=h100", "parallel.gpus=1024"], "cluster h100 allows cluster.max_nodes=64"),
])
def test_layouts_that_cannot_run(overrides, message):
    with pytest.raises(LayoutError) as err:
        plan_point(compose_scale(*overrides))
    assert message in str(err.value)


def test_model_parallel_point_checks_its_scheme():
    cfg = compose_scale("experiment=partition_compare")
    with pytest.raises(LayoutError, match="parallel.partition='hexagons': choose one of"):
        plan_point(compose_scale("experiment=partition_compare", "parallel.partition=hexagons"))
    plan = plan_point(cfg)
    assert (plan.layout, plan.model_parallel, plan.partition) == ("dp1xmp2", 2, "sfc")


@pytest.mark.parametrize("args, wanted", [
    (["cluster=h300"], "Could not find 'cluster/h300'"),
    (["experiment=fastest"], "Could not find 'experiment/fastest'"),
])
def test_unknown_cluster_or_experiment_names_the_options(args, wanted, tmp_path):
    done = run_scale(args, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and wanted in line and "Available options" in line
    assert "h100" in line if "cluster" in wanted else "strong_scaling" in line


def test_single_point_with_more_ranks_than_processes(tmp_path, tiny):
    done = run_scale([*tiny, "parallel.gpus=2"], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: point asks for parallel.gpus=2 ranks but runs as 1 process")
    assert "--multirun" in last
