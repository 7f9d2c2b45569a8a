"""The ensemble axis of the planner (squall.planning.estimate, squall.planning.scaling): world =
ensemble x model_parallel x data_parallel, members per rank, the member all-gather's bytes
against the tensor a rank really receives, memory per rank."""

from __future__ import annotations

import pytest
import torch

from squall.errors import ConfigError
from squall.models.forecaster import ModelConfig
from squall.parallel.parallelize import ParallelConfig, local_grid_indices
from squall.planning.estimate import estimate, format_estimate
from squall.planning.scaling import Calibration, ClusterSpec, ScalingModel, calibrate

LAYERS = 2
ENS = ModelConfig(num_channels=32, num_heads=4, processor_layers=LAYERS, mlp_ratio=4,
                  trainable_edge_features=8, ensemble_members=4, noise_channels=4)  # fmt: skip
VARS = (5, 4)
# 4 GPUs per node, every number distinct (as tests/planning/test_scaling_model.py)
CLUSTER = ClusterSpec(name="test", gpus_per_node=4, memory_gib=80.0, nvlink_Bps=400e9,
                      network_Bps=40e9, exchange_latency_s=150e-6, peer_latency_s=70e-6,
                      collective_latency_s=20e-6, hbm_Bps=3e12)  # fmt: skip


def test_member_gather_moves_the_other_ranks_members_of_this_ranks_grid_part(small_graph):
    """ens2 x mp2 on 4 ranks: each rank runs 2 of the 4 members; its gather receives the other
    ensemble rank's 2 members on exactly its own grid points (the real partition's rows), in
    the activation dtype, once per rollout step."""
    pcfg = ParallelConfig(model_parallel=2, ensemble=2)
    layout, ranks, params, _ = estimate(small_graph, ENS, pcfg, 4, 3, VARS, rollout=2,
                                        members=4)  # fmt: skip
    assert (layout.ensemble, layout.model_parallel, layout.data_parallel) == (2, 2, 1)
    for r in ranks:
        assert r.members == 2
        grid = local_grid_indices(small_graph, pcfg, r.model_rank, LAYERS)
        received = torch.empty(3, 2, len(grid), VARS[1], dtype=torch.bfloat16)
        assert r.member_gather_bytes_per_step == 2 * received.nbytes  # (E - 1) ranks x 2 steps
        # every rank holds every parameter: the gradient all-reduce spans all 4 ranks
        assert r.grad_allreduce_bytes_per_step == int(2 * 3 / 4 * 4 * params)
    text = format_estimate(layout, ranks, params, small_graph, ENS, pcfg, 3)
    assert "ensemble=2 x model_parallel=2 x data_parallel=1" in text
    assert "4 members per sample, 2 per rank" in text and "members MB/step" in text


def test_spreading_members_divides_activation_memory_and_keeps_the_state(small_graph):
    """One rank holding 4 members keeps about twice the activations of a rank holding 2 of them
    (ens2), the same state, and no gather; a deterministic model gathers nothing."""
    alone = estimate(small_graph, ENS, ParallelConfig(), 1, 1, VARS, members=4)[1][0]
    spread = estimate(small_graph, ENS, ParallelConfig(ensemble=2), 2, 1, VARS, members=4)[1]
    assert alone.members == 4 and alone.member_gather_bytes_per_step == 0
    for r in spread:
        assert r.activation_gib == pytest.approx(alone.activation_gib / 2, rel=0.05)
        assert r.activation_gib < alone.activation_gib
    # the flat gradient buffer of the all-reduce comes with the second rank
    assert spread[0].static_gib > alone.static_gib
    det = estimate(small_graph, ModelConfig(num_channels=32, num_heads=4, processor_layers=LAYERS),
                   ParallelConfig(), 1, 1, VARS, members=1)[1][0]  # fmt: skip
    assert det.members == 1 and det.member_gather_bytes_per_step == 0


def test_members_that_do_not_split_are_one_clear_error(small_graph):
    with pytest.raises(ConfigError, match=r"members=3 does not split over ensemble=2"):
        estimate(small_graph, ENS, ParallelConfig(ensemble=2), 2, 1, VARS, members=3)
    with pytest.raises(ConfigError, match=r"world_size=6 must be a positive multiple of "
                                          r"ensemble=4 x model_parallel=1"):  # fmt: skip
        estimate(small_graph, ENS, ParallelConfig(ensemble=4), 6, 1, VARS, members=4)


def test_projection_spreads_members_and_times_their_gather(small_graph):
    cal = Calibration("test", "gpu", small_graph.name, ENS, 1, 0.05, num_vars=VARS)
    model = ScalingModel(small_graph, ENS, calibrate(cal, small_graph, CLUSTER.hbm_Bps), CLUSTER,
                         num_vars=VARS)  # fmt: skip
    one = model.project(1, 1, 1)
    assert one.step_s == pytest.approx(0.05, rel=1e-6)  # the calibration, all 4 members here
    ens2 = model.project(2, 1, 1, ensemble=2)
    ens4 = model.project(4, 1, 1, ensemble=4)
    assert ens2.layout == "ens2xdp1xmp1" and ens2.data_parallel == 1
    # each rank runs half (a quarter) of the member rows: half (a quarter) of the compute
    assert ens2.compute_s == pytest.approx(one.compute_s / 2, rel=1e-9)
    assert ens4.compute_s == pytest.approx(one.compute_s / 4, rel=1e-9)
    assert one.member_s == 0 < ens2.member_s < ens4.member_s
    assert ens2.member_samples_per_s == pytest.approx(4 * ens2.samples_per_s)
    # beyond the node (4 GPUs) the ensemble group's gather crosses the network
    across = model.project(8, 4, 1, ensemble=2)
    inside = model.project(8, 2, 1, ensemble=2)
    assert across.member_s > inside.member_s
    with pytest.raises(ConfigError, match="members=4 does not split over ensemble=3"):
        model.project(3, 1, 1, ensemble=3)
    # under a budget that one rank holding 4 members misses, the chooser spreads them
    need = model.least_memory_gib(2, 1, 1, False)
    spread_need = model.least_memory_gib(2, 1, 1, False, ensemble=2)
    assert spread_need < need
    best, fitting = model.choose(2, 1, "weak", budget_gib=(need + spread_need) / 2 + 1.0)
    assert best.ensemble == 2 or best.model_parallel == 2 or best.shard
    assert {p.layout for p in fitting} >= {"ens2xdp1xmp1"}
