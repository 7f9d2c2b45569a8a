"""Halo exchange on gloo: exact rows forward, gradients sent back and added, P = 1 to 4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parallel_workers import spawn, tiny_graph

from squall.parallel.comm import HaloExchange, gather_nodes
from squall.parallel.halo import build_halo_plans
from squall.parallel.partition import partition_graph

B, C = 2, 3


def _value(gid: np.ndarray) -> torch.Tensor:
    """Row of global source ``gid``: ``[B, n, C]`` with entries ``1000 b + 10 gid + c`` (exact)."""
    gid = torch.as_tensor(gid, dtype=torch.float64)
    b = torch.arange(B, dtype=torch.float64)[:, None, None]
    c = torch.arange(C, dtype=torch.float64)[None, None, :]
    return 1000 * b + 10 * gid[None, :, None] + c


def _weight(receiver: int, gid: np.ndarray) -> torch.Tensor:
    """Gradient a receiving rank puts on halo row ``gid`` (distinct per receiver)."""
    return (
        _value(gid) * 0
        + (receiver + 1)
        + torch.as_tensor(gid, dtype=torch.float64)[None, :, None] / 7
    )


def _check(rank, world, method):
    g = tiny_graph()
    part = partition_graph(g, world, method)
    for role, e in g.edges.items():
        plans = build_halo_plans(e, part)
        plan = plans[rank]
        ex = HaloExchange(plan)
        x = _value(plan.owned_src).requires_grad_(True)
        for asynchronous in (True, False):
            halo = ex.start(x).wait() if asynchronous else ex(x)
            assert torch.equal(halo, _value(plan.halo_src)), (role, rank)
        halo = ex.start(x).wait()
        (halo * _weight(rank, plan.halo_src)).sum().backward()
        # owner's gradient: sum over every rank that received the row of that rank's weight
        expected = torch.zeros_like(x)
        for q, other in enumerate(plans):
            mine = np.isin(other.halo_src, plan.owned_src)
            rows = np.searchsorted(plan.owned_src, other.halo_src[mine])
            expected[:, rows] += _weight(q, other.halo_src[mine])
        assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12), (role, rank)
        # evaluation gather: the whole source set back in global order
        full = gather_nodes(_value(plan.owned_src), [p.owned_src for p in plans])
        assert torch.equal(full, _value(np.arange(e.num_src)))


@pytest.mark.parametrize(("world", "method"), [(2, "sfc"), (3, "ranges"), (4, "sfc")])
def test_exchange_moves_exactly_the_halo_rows(world, method):
    spawn(_check, world, method)


def test_one_part_has_nothing_to_exchange():
    g = tiny_graph()
    part = partition_graph(g, 1)
    for e in g.edges.values():
        (plan,) = build_halo_plans(e, part)
        assert not plan.group_exchanges and len(plan.halo_src) == 0
        assert plan.send_counts.tolist() == [0] and len(plan.interior.dst) == e.num_dst
