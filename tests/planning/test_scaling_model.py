"""Scaling model (squall.planning.scaling) against facts it does not compute itself: the real
halo plans, conservation of the graph under partitioning, the calibration run, memory budgets,
and communication that can only grow with the GPU count."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from squall.errors import ConfigError
from squall.layers.graph_transformer import block_flops
from squall.models.forecaster import ROLES, ModelConfig
from squall.parallel.halo import build_halo_plans
from squall.parallel.partition import partition_graph
from squall.planning.estimate import PLAN_HEADROOM_GIB
from squall.planning.scaling import (
    Calibration,
    ClusterSpec,
    ScalingModel,
    calibrate,
    extrapolate_sizes,
    load_calibration,
    partition_sizes,
    whole_graph_sizes,
)

LAYERS = 3
MCFG = ModelConfig(num_channels=64, num_heads=4, processor_layers=LAYERS, mlp_ratio=4,
                   trainable_edge_features=8)  # fmt: skip
# An HGX-like node of 4 GPUs: every number distinct, so a term read from the wrong link shows.
CLUSTER = ClusterSpec(name="test", gpus_per_node=4, memory_gib=80.0, nvlink_Bps=400e9,
                      network_Bps=40e9, exchange_latency_s=150e-6, peer_latency_s=70e-6,
                      collective_latency_s=20e-6, hbm_Bps=3e12)  # fmt: skip


def model_on(graph, mcfg=MCFG, step_s=0.050, **kw) -> ScalingModel:
    cal = Calibration("test", "gpu", graph.name, mcfg, 1, step_s, num_vars=(5, 4))
    rates = calibrate(cal, graph, CLUSTER.hbm_Bps)
    return ScalingModel(graph, mcfg, rates, CLUSTER, num_vars=(5, 4), **kw)


@pytest.mark.parametrize("parts", [2, 3, 4, 8])
def test_halo_rows_are_the_rows_the_real_plans_exchange(small_graph, parts):
    sizes = partition_sizes(small_graph, parts, LAYERS, gpus_per_node=4)
    part = partition_graph(small_graph, parts, "sfc", edge_weights={"processor": LAYERS})
    node = np.arange(parts) // 4
    for role in ROLES:
        plans = build_halo_plans(small_graph.edges[role], part)
        for r, plan in enumerate(plans):
            same = node == node[r]
            assert sizes.recv[role][r].tolist() == [
                int(plan.recv_counts[same].sum()),
                int(plan.recv_counts[~same].sum()),
            ]
            assert sizes.send[role][r].tolist() == [
                int(plan.send_counts[same].sum()),
                int(plan.send_counts[~same].sum()),
            ]
            assert sizes.rows[f"src_{role}"][r] == plan.num_local_src
            assert sizes.edges[role][r] == len(plan.edge_ids)
            assert sizes.peers[role][r] == len(plan.peers)
        # every row one rank receives another sends
        assert sizes.recv[role].sum() == sizes.send[role].sum()


def test_partition_keeps_every_row_and_edge_once(small_graph):
    rows, edges = whole_graph_sizes(small_graph)
    for parts in (1, 2, 5, 16):
        s = partition_sizes(small_graph, parts, LAYERS)
        assert s.rows["data"].sum() == rows["data"] and s.rows["mesh"].sum() == rows["mesh"]
        assert {k: int(v.sum()) for k, v in s.edges.items()} == edges


def test_the_calibration_run_is_reproduced(small_graph):
    """Calibrated on a run, the model predicts that run's own step (the FLOP accounting of
    calibration and projection agree), with and without a processor time."""
    for proc in (None, 0.030):
        cal = Calibration("t", "gpu", small_graph.name, MCFG, 1, 0.050, proc, num_vars=(5, 4))
        m = ScalingModel(small_graph, MCFG, calibrate(cal, small_graph, CLUSTER.hbm_Bps), CLUSTER,
                         num_vars=(5, 4))  # fmt: skip
        p = m.project(1, 1, 1)
        assert p.step_s == pytest.approx(0.050, rel=1e-12)
        assert p.halo_s == 0 and p.grad_s == 0


def test_compute_follows_the_largest_ranks_share_of_the_work(small_graph):
    """At P = 4 the compute term is the one-GPU compute times the largest rank's FLOPs over the
    whole graph's, the FLOPs counted here from the real halo plans' edges and local sources."""
    m = model_on(small_graph)
    one = m.project(1, 1, 1).compute_s
    four = m.project(4, 4, 1).compute_s
    part = partition_graph(small_graph, 4, "sfc", edge_weights={"processor": LAYERS})
    plans = {role: build_halo_plans(small_graph.edges[role], part) for role in ROLES}
    c, dims = MCFG.num_channels, m.dims
    uses = {"encoder": 1, "processor": LAYERS, "decoder": 1}

    def flops(n_dst, n_src, e, role):
        return uses[role] * block_flops(c, MCFG.mlp_ratio, dims[role], n_src, n_dst, e)

    whole = sum(flops(small_graph.edges[r].num_dst, small_graph.edges[r].num_src,
                      small_graph.edges[r].num_edges, r) for r in ROLES)  # fmt: skip
    ranks = [sum(flops(len(plans[r][k].owned_dst), plans[r][k].num_local_src,
                       len(plans[r][k].edge_ids), r) for r in ROLES) for k in range(4)]  # fmt: skip
    # model-parallel blocks run as the calibration did (eager here): one rate, so ratios hold
    assert four / one == pytest.approx(max(ranks) / whole, rel=1e-9)
    # and the halo's sources make the ranks' total exceed the whole graph's work
    assert sum(ranks) > whole


def test_a_layout_that_does_not_fit_is_never_chosen(small_graph):
    m = model_on(small_graph)
    budget = 0.6 * m.least_memory_gib(1, 1, 16, False) + PLAN_HEADROOM_GIB
    best, fitting = m.choose(8, 16, "strong", budget_gib=budget)
    assert fitting and best in fitting
    for p in fitting:
        assert p.peak_gib <= budget - PLAN_HEADROOM_GIB
    # every candidate that even fully checkpointed needs more is absent
    for mp in (1, 2, 4, 8):
        for shard in (False, True):
            need = m.least_memory_gib(8, mp, 16 // (8 // mp), shard)
            if need > budget - PLAN_HEADROOM_GIB:
                assert not [p for p in fitting if p.model_parallel == mp and p.shard == shard]
    assert best.samples_per_s == max(p.samples_per_s for p in fitting)
    # on one GPU the same budget does not hold the batch: a one-line reason, no layout
    with pytest.raises(ConfigError, match=r"no layout of 1 GPUs fits .* needs [\d.]+ GiB"):
        m.choose(1, 16, "strong", budget_gib=budget)


def test_sharding_divides_the_state_and_is_chosen_only_when_memory_requires_it(small_graph):
    big = replace(MCFG, num_channels=512, num_heads=8)
    m = model_on(small_graph, big)
    assert m.static_gib(8, True) < m.static_gib(8, False) / 4
    roomy, _ = m.choose(8, 8, "weak", budget_gib=1000.0)
    assert not roomy.shard  # same bytes plus per-block latency: never faster with room to spare
    tight = m.static_gib(8, False) + 0.5 * (m.least_memory_gib(8, 8, 8, False)
                                            - m.static_gib(8, False))  # fmt: skip
    best, fitting = m.choose(8, 8, "weak", budget_gib=tight + PLAN_HEADROOM_GIB)
    assert all(p.peak_gib <= tight for p in fitting)
    # below the unsharded state itself only sharded layouts remain, and one is chosen
    below = 0.9 * m.static_gib(8, False)
    best, fitting = m.choose(8, 8, "weak", budget_gib=below + PLAN_HEADROOM_GIB)
    assert best.shard and all(p.shard and p.peak_gib <= below for p in fitting)


def test_communication_grows_with_the_gpu_count(small_graph):
    m = model_on(small_graph)
    halo_total, grad = [], []
    for gpus in (1, 2, 4, 8, 16, 32):
        s = m.sizes(gpus)
        halo_total.append(sum(int(v.sum()) for v in s.recv.values()))
        grad.append(m.project(gpus, 1, 1).grad_s)
    assert all(a < b for a, b in zip(halo_total, halo_total[1:], strict=False))
    assert all(a < b for a, b in zip(grad, grad[1:], strict=False))
    # gradients of a wide model: within one node (4 GPUs) faster than the network could carry
    # them, across two nodes at least the bytes over the network
    wide = model_on(small_graph, replace(MCFG, num_channels=512, num_heads=8))
    ring = 2 * 4 * wide.params / CLUSTER.network_Bps  # fp32 all-reduce, two ring passes
    assert wide.project(4, 1, 1).grad_s < ring * 3 / 4
    assert wide.project(8, 1, 1).grad_s >= ring * 7 / 8


def test_extrapolation_is_surface_to_volume_and_marked(small_graph):
    base = partition_sizes(small_graph, 4, LAYERS, gpus_per_node=4)
    far = extrapolate_sizes(base, 64, gpus_per_node=4)
    assert not far.exact and base.exact
    # per rank: edges as 1/P, halo as 1/sqrt(P) (4 -> 64 parts: 1/16 and 1/4)
    assert far.edges["processor"][0] == pytest.approx(base.edges["processor"].max() / 16, abs=1)
    assert far.recv["processor"][0].sum() == pytest.approx(
        base.recv["processor"].sum(1).max() / 4, abs=1
    )
    # the base spans one node, the extrapolated group sixteen: every halo row crosses nodes
    assert far.recv["processor"][0][0] == 0
    m = model_on(small_graph, exact_parts=8)
    assert m.sizes(8).exact and not m.sizes(16).exact


def test_calibration_specs_and_their_errors(tmp_path):
    with pytest.raises(ConfigError, match="no file"):
        load_calibration(str(tmp_path / "missing.csv?git=x"))
    rows = "graph,channels,layers,heads,vars,backend,checkpoint,step_ms_median,peak_GiB,git,gpu,"
    rows += "compile,checkpoint_plan,processor_ms_median\n"
    plan = '"encoder full, processor 2 mlp, 1 full, decoder none"'
    rows += f"g,64,3,4,5,triton,budget:1,50.0,1.5,aaa,X,True,{plan},30.0\n"
    rows += f"g,64,3,4,5,triton,off,40.0,2.5,bbb,X,True,{plan},25.0\n"
    path = tmp_path / "step.csv"
    path.write_text(rows)
    cal = load_calibration(f"{path}?git=aaa")
    assert (cal.step_s, cal.processor_s, cal.peak_gib) == (0.05, 0.03, 1.5)
    assert cal.mcfg.checkpoint_processor == ("mlp", "mlp", "full")
    assert cal.mcfg.checkpoint_decoder == "none" and cal.mcfg.compile
    with pytest.raises(ConfigError, match="2 rows match"):
        load_calibration(f"{path}?graph=g")


@pytest.mark.slow
def test_calibration_from_an_mlflow_run(mlflow_server, small_graph):
    """A one-GPU run in a real MLflow server: model from its flattened config, the budget's
    checkpoint plan resolved as the run's planner did, its step reproduced."""
    from mlflow.tracking import MlflowClient

    from squall.parallel.parallelize import ParallelConfig
    from squall.planning.estimate import estimate
    from squall.tracking import flatten_config
    from squall.tracking import metrics as m

    # a budget between the estimates of no and of full recomputation: the planner must choose
    one = ParallelConfig()
    totals = [estimate(small_graph, replace(MCFG, checkpoint_encoder=p, checkpoint_processor=p,
                                            checkpoint_decoder=p), one, 1, 1, (5, 5))[1][0]
              for p in ("none", "full")]  # fmt: skip
    budget = PLAN_HEADROOM_GIB + sum(t.total_gib for t in totals) / 2
    model = {"num_channels": 64, "num_heads": 4, "processor_layers": LAYERS, "mlp_ratio": 4,
             "trainable_edge_features": 8, "attention_backend": "torch", "compile": False,
             "checkpoint": {"encoder": "none", "processor": "none", "decoder": "none",
                            "budget_gib": budget}}  # fmt: skip
    config = {"model": model, "graph": {"name": small_graph.name}, "parallel": {"gpus": 1},
              "data": {"variables": ["a", "b", "c", "d", "e", "f"], "forcings": ["e"],
                       "diagnostics": ["f"], "input_steps": 2}, "scale": {"batch": 1}}  # fmt: skip
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("calibration")
    run = client.create_run(exp, tags={"env.gpu_name": "NVIDIA H200"})
    for key, value in flatten_config(config).items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, m.STEP_S, 0.05)
    client.log_metric(run.info.run_id, m.PEAK_ALLOCATED_GIB, 0.04)
    client.set_terminated(run.info.run_id)

    cal = load_calibration(f"mlflow:{run.info.run_id}@{mlflow_server}")
    assert (cal.gpu, cal.graph, cal.step_s, cal.peak_gib) == ("NVIDIA H200", "o16_l3", 0.05, 0.04)
    assert cal.num_vars == (5, 5) and cal.mcfg.num_channels == 64
    rates = calibrate(cal, small_graph, CLUSTER.hbm_Bps)
    planned = estimate(small_graph, cal.mcfg, ParallelConfig(), 1, 1, (5, 5), 2)[3]
    assert planned.checkpoint_processor != ("none",) * LAYERS  # the budget forced recomputation
    sm = ScalingModel(small_graph, replace(planned, checkpoint_budget_gib=None), rates, CLUSTER,
                      num_vars=(5, 5))  # fmt: skip
    assert sm.project(1, 1, 1).step_s == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ConfigError, match="cannot read the run"):
        load_calibration(f"mlflow:0123456789abcdef@{mlflow_server}")


def test_prediction_against_measurement_rows(small_graph):
    from squall.planning.scaling import compare_to_measurement

    m = model_on(small_graph)
    truth = m.project(2, 2, 1)
    rows = compare_to_measurement(m, [
        {"gpus": 2, "model_parallel": 2, "batch": 1, "step_s": truth.step_s * 1.25,
         "peak_gib": None},
    ])  # fmt: skip
    assert rows[0]["layout"] == "dp1xmp2" and rows[0]["err_gib"] is None
    assert rows[0]["err_s"] == pytest.approx(1 / 1.25 - 1)
