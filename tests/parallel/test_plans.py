"""Partition and halo plans: pure functions, checked without any process group."""

from __future__ import annotations

import numpy as np
import pytest
from parallel_workers import tiny_graph

from squall.distributed.layout import Layout, LayoutError
from squall.graphs import build_graph
from squall.parallel.halo import build_halo_plans, chunk_subgraphs, interior_first_order
from squall.parallel.parallelize import ParallelConfig
from squall.parallel.partition import (
    hilbert_index,
    partition_graph,
    partition_report,
    sfc_keys,
    split_weighted,
)


def _brute_force(g, part) -> dict:
    """Per edge set and part, edge by edge in plain Python: the edges into the part's nodes, the
    halo (sources it reads but does not own) and the parts owning that halo."""
    out = {}
    for role, e in g.edges.items():
        src_owner, dst_owner = part.owner[e.src], part.owner[e.dst]
        edges = [0] * part.num_parts
        halo = [set() for _ in range(part.num_parts)]
        for src, dst in zip(e.row.tolist(), e.dst_index.tolist(), strict=True):
            r = int(dst_owner[dst])
            edges[r] += 1
            if src_owner[src] != r:
                halo[r].add(src)
        peers = [{int(src_owner[s]) for s in h} for h in halo]
        out[role] = {"edges": edges, "halo": halo, "peers": peers}
    return out


def test_hilbert_curve_visits_every_cell_once_through_neighbours():
    bits = 4
    x, y = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    d = hilbert_index(x.ravel(), y.ravel(), bits)
    assert np.array_equal(np.sort(d), np.arange(256))
    order = np.argsort(d)
    steps = np.abs(np.diff(x.ravel()[order])) + np.abs(np.diff(y.ravel()[order]))
    assert (steps == 1).all()


def test_sfc_keys_keep_neighbours_close():
    g = tiny_graph("O16", 3)
    xyz = g.nodes["hidden"].xyz
    order = np.argsort(sfc_keys(xyz))
    # consecutive nodes along the curve are mostly neighbours: median gap below 2 mesh spacings
    gaps = np.linalg.norm(np.diff(xyz[order], axis=0), axis=1)
    spacing = np.median(
        np.linalg.norm(xyz[g.edges["processor"].row] - xyz[g.edges["processor"].dst_index], axis=1)
    )
    assert np.median(gaps) < 2 * spacing


def test_split_weighted_keeps_parts_non_empty_and_balanced():
    w = np.ones(10)
    w[0] = 1000.0  # one huge node must not empty the other parts
    owner = split_weighted(np.arange(10), w, 4)
    assert np.array_equal(np.unique(owner), np.arange(4))
    owner = split_weighted(np.arange(12)[::-1], np.ones(12), 3)
    assert np.array_equal(np.bincount(owner), [4, 4, 4]) and owner[11] == 0


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("method", ["sfc", "ranges", "bands", "work"])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_partition_and_plan_invariants(method, parts, ordered):
    g = tiny_graph()
    part = partition_graph(g, parts, method, edge_weights={"processor": 2})
    order = None
    if ordered:  # the model's numbering: mesh nodes processor-interior first
        order = {"hidden": interior_first_order(build_halo_plans(g.edges["processor"], part))}
    for name, nodes in g.nodes.items():
        owner = part.owner[name]
        assert owner.shape == (len(nodes),) and owner.min() >= 0 and owner.max() < parts
        assert (part.counts(name) > 0).all(), f"{name}: an empty part"
    brute = _brute_force(g, part)
    for role, e in g.edges.items():
        plans = build_halo_plans(e, part, order)
        for r, p in enumerate(plans):
            assert set(p.halo_src.tolist()) == brute[role]["halo"][r], (role, r)
            assert len(p.edge_ids) == brute[role]["edges"][r], (role, r)
            assert set(np.flatnonzero(p.recv_counts).tolist()) == brute[role]["peers"][r], (role, r)
        seen = np.concatenate([p.edge_ids for p in plans])
        assert np.array_equal(np.sort(seen), np.arange(e.num_edges)), "every edge exactly once"
        for r, p in enumerate(plans):
            assert np.array_equal(np.sort(p.owned_dst), part.owned(e.dst, r))
            assert np.array_equal(np.sort(p.owned_src), part.owned(e.src, r))
            if not ordered:
                assert np.array_equal(p.owned_dst, part.owned(e.dst, r))
            # every edge sits on its destination's owner, each destination's edges in CSC order
            dst_local = np.repeat(np.arange(len(p.owned_dst)), np.diff(p.colptr))
            assert np.array_equal(p.owned_dst[dst_local], e.dst_index[p.edge_ids])
            assert (np.diff(p.edge_ids)[np.diff(dst_local) == 0] == 1).all()
            if ordered and e.src == e.dst:
                n_int = p.interior.num_dst
                assert np.array_equal(p.interior.dst, np.arange(n_int))
                assert np.array_equal(p.interior.src, np.arange(p.num_owned_src))
            # local sources = [owned; halo] map back to the global sources
            local_src = np.concatenate([p.owned_src, p.halo_src])
            assert np.array_equal(local_src[p.row], e.row[p.edge_ids])
            # halo: not owned, grouped by owner ascending, ascending ids inside a group
            src_owner = part.owner[e.src][p.halo_src]
            assert (src_owner != r).all() and (np.diff(src_owner) >= 0).all()
            for q in range(parts):
                assert (np.diff(p.halo_src[src_owner == q]) > 0).all()
            assert np.array_equal(p.recv_counts, np.bincount(src_owner, minlength=parts))
            # what r sends to q is exactly q's halo rows owned by r, in q's order
            starts = np.concatenate([[0], np.cumsum(p.send_counts)])
            for q, other in enumerate(plans):
                sent = p.owned_src[p.send_index[starts[q] : starts[q + 1]]]
                wanted = other.halo_src[part.owner[e.src][other.halo_src] == r]
                assert np.array_equal(sent, wanted)
                assert p.send_counts[q] == other.recv_counts[r]
            # interior destinations read owned rows only, boundary ones at least one halo row
            n_own = p.num_owned_src
            assert (p.interior.src < n_own).all()
            for j, d in enumerate(p.boundary.dst):
                assert (p.row[p.colptr[d] : p.colptr[d + 1]] >= n_own).any(), j
            assert np.array_equal(np.sort(np.concatenate([p.interior.dst, p.boundary.dst])),
                                  np.arange(len(p.owned_dst)))  # fmt: skip
            for sub in (p.full, p.interior, p.boundary):
                assert np.array_equal(sub.src[sub.row], p.row[sub.edges])
                if sub.square:
                    assert np.array_equal(sub.src[: sub.num_dst], sub.dst)
            chunks = chunk_subgraphs(p, g.nodes[e.dst].xyz, min(3, len(p.owned_dst)))
            cat = np.concatenate([c.dst for c in chunks])
            assert np.array_equal(np.sort(cat), np.arange(len(p.owned_dst)))
            assert np.array_equal(np.sort(np.concatenate([c.edges for c in chunks])),
                                  np.arange(len(p.edge_ids)))  # fmt: skip
            for c in chunks:
                assert np.array_equal(c.src[c.row], p.row[c.edges])
        assert all(len(p.halo_src) == 0 for p in plans) == (not plans[0].group_exchanges)
        if parts == 1:
            assert not plans[0].group_exchanges


@pytest.mark.parametrize(("method", "parts"), [("sfc", 3), ("ranges", 4), ("bands", 2)])
def test_report_matches_a_count_over_the_edge_lists(method, parts):
    g = tiny_graph()
    part = partition_graph(g, parts, method)
    rep = partition_report(g, part)
    brute = _brute_force(g, part)
    for role, b in brute.items():
        assert rep.halo_rows[role] == sum(len(h) for h in b["halo"])
        assert rep.edge_imbalance[role] == pytest.approx(
            max(b["edges"]) / np.mean(b["edges"]), rel=1e-12
        )
        for r in range(parts):
            assert rep.parts[r].edges[role] == b["edges"][r]
            assert rep.parts[r].halo_rows[role] == len(b["halo"][r])
            assert set(rep.parts[r].peers[role]) == b["peers"][r]
    total = np.sum([b["edges"] for b in brute.values()], axis=0)
    assert rep.edge_imbalance["total"] == pytest.approx(total.max() / total.mean(), rel=1e-12)
    assert rep.halo_rows["total"] == sum(rep.halo_rows[k] for k in brute)
    assert f"part {parts - 1}" in rep.table()


def test_locality_aware_partition_cuts_the_halo():
    """Plan-only: the SFC partition needs far fewer halo rows than index ranges (o32_l4; the
    o320_l7 numbers are in profiling/results/parallel_partition.md)."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load(Path(__file__).parents[2].joinpath("conf/graph/o32_l4.yaml").read_text())
    g = build_graph(spec)
    for parts, target in ((4, 0.30), (16, 0.50)):
        halo = {m: partition_report(g, partition_graph(g, parts, m)).halo_rows["total"]
                for m in ("sfc", "ranges", "bands")}  # fmt: skip
        assert halo["sfc"] <= (1 - target) * halo["ranges"], (parts, halo)
        assert halo["sfc"] < halo["bands"], (parts, halo)


def test_degree_errors_print_every_number():
    with pytest.raises(LayoutError, match=r"world_size=6 .*model_parallel=4.*1\.5"):
        Layout(6, 4)
    with pytest.raises(LayoutError, match=r"model_parallel=8 exceeds gpus_per_node=4"):
        Layout(8, 8).check({"data": 100, "hidden": 50}, batch_size=2, gpus_per_node=4)
    with pytest.raises(LayoutError, match=r"'hidden': 3"):
        Layout(4, 4).check({"data": 100, "hidden": 3}, batch_size=1)
    with pytest.raises(LayoutError, match="partition"):
        ParallelConfig(partition="metis")
    lay = Layout(8, 2)
    assert lay.data_parallel == 4 and lay.model_groups()[1] == [2, 3]
    assert lay.data_groups()[1] == [1, 3, 5, 7] and lay.model_rank(5) == 1 and lay.data_rank(5) == 2


def test_dry_run_estimates_match_the_edge_lists():
    from squall.models.forecaster import GraphForecaster, ModelConfig
    from squall.planning.estimate import estimate, format_estimate

    g = tiny_graph()
    mcfg = ModelConfig(num_channels=16, num_heads=4, processor_layers=3)
    pcfg = ParallelConfig(model_parallel=2)
    layout, ranks, params, mcfg = estimate(g, mcfg, pcfg, world_size=4, batch=2, num_vars=(5, 4))
    assert layout.data_parallel == 2 and len(ranks) == 2
    part = partition_graph(g, 2, "sfc", edge_weights={"processor": 3})
    brute = _brute_force(g, part)
    model = GraphForecaster(g, mcfg, 5, 4, 2)
    assert params == sum(p.numel() for p in model.parameters())
    for r in ranks:
        assert r.halo_rows == {k: len(b["halo"][r.model_rank]) for k, b in brute.items()}
        # at least fp32 weights, gradients and AdamW's two moments
        assert r.static_gib * 1024**3 >= 16 * params
        # a ring all-reduce over N ranks sends 2 (N - 1) / N of the fp32 gradients per rank
        assert r.grad_allreduce_bytes_per_step == int(2 * 3 / 4 * 4 * params)
        assert r.activation_gib > 0
    # the halo bytes are checked against the bytes the exchange moves in test_sharded_model
    assert sum(r.nodes["data"] for r in ranks) == len(g.nodes["data"])
    assert "data_parallel=2" in format_estimate(layout, ranks, params, g, mcfg, pcfg, 2)
    with pytest.raises(LayoutError, match="world_size=6.*model_parallel=4"):
        estimate(g, mcfg, ParallelConfig(model_parallel=4), world_size=6, batch=1)


def test_checkpoint_plan_fits_the_budget_with_the_least_recomputation():
    from dataclasses import replace

    from squall.models.forecaster import ModelConfig
    from squall.planning.estimate import (
        PLAN_HEADROOM_GIB,
        activation_bytes,
        estimate,
        recompute_flops,
    )  # fmt: skip

    g = tiny_graph()
    base = ModelConfig(num_channels=64, num_heads=4, processor_layers=4, mlp_ratio=4)
    pcfg = ParallelConfig()
    _, ranks, _, _ = estimate(g, base, pcfg, 1, 1)
    r = ranks[0]
    by_policy = [activation_bytes(replace(base, checkpoint_encoder=p, checkpoint_processor=p,
                               checkpoint_decoder=p), 1, r.nodes, r.edges, 2)
                 for p in ("none", "mlp", "full")]  # fmt: skip
    assert by_policy[0] > by_policy[1] > by_policy[2]
    # the estimate's peaks (activations, gradients and weight copies of the step's phases):
    # keeping everything, and the smallest plan
    everything = PLAN_HEADROOM_GIB + estimate(g, replace(
        base, checkpoint_encoder="none", checkpoint_processor="none", checkpoint_decoder="none"),
        pcfg, 1, 1)[1][0].total_gib  # fmt: skip
    import torch

    from squall.models.forecaster import GraphForecaster
    from squall.planning.estimate import ModelSizes, smallest_plan

    with torch.device("meta"):
        sizes = ModelSizes.of(GraphForecaster(g, base, 100, 100, 2), g)
    least = PLAN_HEADROOM_GIB + smallest_plan(base, r.static_gib, 1, r.nodes, r.edges,
                                              sizes=sizes)[0]  # fmt: skip
    previous_flops = None
    for frac in (1.01, 0.8, 0.6, 0.4):
        budget = least + frac * (everything - least)
        _, ranks_b, _, cfg = estimate(g, replace(base, checkpoint_budget_gib=budget), pcfg, 1, 1)
        assert ranks_b[0].total_gib <= budget - PLAN_HEADROOM_GIB + 1e-9
        flops = recompute_flops(cfg, 1, r.nodes, r.edges,
                                {"encoder": 3, "processor": 3, "decoder": 3})  # fmt: skip
        if frac > 1:
            assert cfg.checkpoint_processor == ("none",) * 4 and flops == 0
        else:
            assert flops > 0 and (previous_flops is None or flops >= previous_flops)
        previous_flops = flops
    with pytest.raises(ValueError, match="the smallest estimate .checkpointing: encoder"):
        estimate(g, replace(base, checkpoint_budget_gib=least - 1e-7), pcfg, 1, 1)


def test_estimate_counts_rollout_chunks_and_where_compile_applies():
    from dataclasses import replace

    from squall.errors import ConfigError
    from squall.models.forecaster import ModelConfig
    from squall.planning.estimate import estimate

    g = tiny_graph()
    base = ModelConfig(num_channels=64, num_heads=4, processor_layers=2, mlp_ratio=4)
    one = ParallelConfig()

    def act(cfg, pcfg=one, **kw):
        return estimate(g, cfg, pcfg, pcfg.model_parallel, 1, **kw)[1][0].activation_gib

    # every rollout step's activations stay until the backward
    assert act(base, rollout=3) > 2.5 * act(base)
    # compiled blocks keep less, but only where the compiled forward runs: one set of
    # destinations per block (a rank's part of the graph too), not with overlap or chunks
    compiled = replace(base, compile=True)
    assert act(compiled) < act(base)
    two = ParallelConfig(model_parallel=2)
    assert act(compiled, two) < act(base, two)
    split = ParallelConfig(model_parallel=2, overlap=True)
    assert act(compiled, split) == act(base, split)
    # chunked mappers always recompute: the estimate says so and keeps the compile flag
    *_, resolved = estimate(g, compiled, ParallelConfig(chunks=2), 1, 1)
    assert (resolved.checkpoint_encoder, resolved.checkpoint_decoder) == ("full", "full")
    assert resolved.compile
    # a budget below the static memory says so, not "add ranks"
    with pytest.raises(ConfigError, match="AdamW state alone"):
        estimate(g, replace(base, checkpoint_budget_gib=1e-4), one, 1, 1)
