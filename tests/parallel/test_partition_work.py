"""Work-balanced partition: counted work against the halo plans, validity and balance bound."""

from __future__ import annotations

import numpy as np
import pytest
from parallel_workers import tiny_graph

from squall.parallel.halo import build_halo_plans
from squall.parallel.parallelize import ParallelConfig, make_partition
from squall.parallel.partition import (
    WorkCosts,
    balance_work,
    measured_costs,
    part_work,
    partition_graph,
    work_weights,
)


def _random_costs(g, seed: int, data_heavy: float = 1.0) -> WorkCosts:
    """Distinct positive costs per edge set and node set (``data_heavy`` scales the grid's)."""
    rng = np.random.default_rng(seed)
    edge = {k: float(rng.uniform(0.5, 2)) for k in g.edges}
    dst = {k: float(rng.uniform(1, 4)) for k in g.edges}
    src = {k: float(rng.uniform(0.2, 1)) for k in g.edges}
    node = {k: float(rng.uniform(0.1, 1)) * (data_heavy if k == "data" else 1) for k in g.nodes}
    return WorkCosts(edge, dst, src, node)


def _work_from_plans(g, part, costs) -> np.ndarray:
    """Every part's work from its halo plans (what the sharded model computes on)."""
    work = np.array([sum(costs.node[n] * len(part.owned(n, r)) for n in g.nodes)
                     for r in range(part.num_parts)])  # fmt: skip
    for role, e in g.edges.items():
        for r, plan in enumerate(build_halo_plans(e, part)):
            work[r] += (costs.edge[role] * len(plan.edge_ids)
                        + costs.dst[role] * len(plan.owned_dst)
                        + costs.src[role] * plan.num_local_src)  # fmt: skip
    return work


@pytest.mark.parametrize(("method", "parts"), [("sfc", 3), ("ranges", 4), ("work", 5)])
def test_part_work_counts_what_the_halo_plans_hold(method, parts):
    g = tiny_graph()
    costs = _random_costs(g, parts)
    part = partition_graph(g, parts, method, costs=costs if method == "work" else None)
    np.testing.assert_allclose(part_work(g, part, costs), _work_from_plans(g, part, costs),
                               rtol=1e-12)  # fmt: skip


@pytest.mark.parametrize("parts", [2, 3, 7])
@pytest.mark.parametrize("data_heavy", [1.0, 30.0])
def test_balanced_partition_is_valid_and_within_its_bound(parts, data_heavy):
    g = tiny_graph()
    costs = _random_costs(g, 7 * parts, data_heavy)
    part = balance_work(g, parts, costs)
    assert part.method == "work" and part.num_parts == parts
    for name, nodes in g.nodes.items():
        owner = part.owner[name]
        # every node owned by exactly one part, every part owns nodes of every set
        assert owner.shape == (len(nodes),) and owner.dtype == np.int32
        assert np.array_equal(np.unique(owner), np.arange(parts))
    work = part_work(g, part, costs)
    w_max = max(work_weights(g, n, costs).max() for n in g.nodes)
    # each cut within one node of its target once the halo work has settled (the docstring)
    assert np.abs(work - work.mean()).max() <= 2 * w_max, (work, w_max)
    # where the node-weighted SFC cut misses that bound, the work cut does better
    sfc = part_work(g, partition_graph(g, parts, "sfc"), costs)
    if np.abs(sfc - sfc.mean()).max() > 2 * w_max:
        assert work.max() < sfc.max()


def test_work_method_through_the_config_and_bad_costs():
    g = tiny_graph()
    cfg = ParallelConfig(model_parallel=3, partition="work")
    part = make_partition(g, cfg, processor_layers=4)
    # the default costs are the measured ones, the processor's per layer times the layers
    costs = measured_costs(g, 4)
    assert costs.edge["processor"] == pytest.approx(4 * measured_costs(g, 1).edge["processor"])
    np.testing.assert_array_equal(part.owner["data"], balance_work(g, 3, costs).owner["data"])
    bad = WorkCosts({"encoder": -1.0}, {}, {}, {})
    with pytest.raises(ValueError, match="non-negative"):
        balance_work(g, 2, bad)
