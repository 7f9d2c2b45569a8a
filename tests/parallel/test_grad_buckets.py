"""GradReducer's buckets: gradients all-reduced during the backward, in pieces, are bitwise the
one flat all-reduce after it (two gloo ranks: every element is the same ``a + b``), scaled by
``1 / data_parallel``; ``no_sync`` accumulates locally and the next backward reduces the sum."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from parallel_workers import spawn
from torch import nn

from squall.parallel.parallelize import GradReducer

DATA_PARALLEL = 2
# a few KiB per bucket: the model below makes several buckets, one tensor larger than a bucket
BUCKET_MB = 4096 / 2**20


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(7, 33)
        self.mid = nn.Sequential(*(nn.Linear(33, 33) for _ in range(3)))
        self.unused = nn.Parameter(torch.ones(5))  # no gradient in any backward: reduces as zeros
        self.last = nn.Linear(33, 3)

    def forward(self, x):
        return self.last(torch.tanh(self.mid(torch.tanh(self.first(x)))))


def _loss(model, rank, step):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return model(torch.randn(9, 7, generator=gen)).square().sum()


def _flat_reference(rank, steps):
    """Local gradients of ``steps`` backward passes, summed, then one flat all-reduce / dp."""
    model = _Net()
    for step in range(steps):
        _loss(model, rank, step).backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    return flat / DATA_PARALLEL


def _note(log, what, _param):
    log.append(what)


def _check(rank, world):
    for bucket_mb in (BUCKET_MB, 0.0):
        model = _Net()
        reducer = GradReducer(model, None, DATA_PARALLEL, bucket_mb)
        if bucket_mb:
            assert len(reducer.buckets) >= 4, reducer.buckets
        else:
            assert len(reducer.buckets) == 1
        log = []
        launch = dist.all_reduce

        def spy(*args, log=log, launch=launch, **kw):
            log.append("all_reduce")
            return launch(*args, **kw)

        model.first.weight.register_post_accumulate_grad_hook(partial(_note, log, "first"))
        dist.all_reduce = spy
        try:
            _loss(model, rank, 0).backward()
        finally:
            dist.all_reduce = launch
        if bucket_mb:  # the last layers' buckets were on the wire before the first layer's grad
            assert log.index("all_reduce") < log.index("first"), log
            assert log.count("all_reduce") == len(reducer.buckets)
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        want = _flat_reference(rank, 1)
        assert torch.equal(got, want), f"bucket_mb={bucket_mb}: {(got - want).abs().max()}"
        assert torch.count_nonzero(model.unused.grad) == 0

        # two local backward passes, then a synced one reduces all three gradients' sum
        model.zero_grad(set_to_none=True)
        with reducer.no_sync():
            _loss(model, rank, 0).backward()
            _loss(model, rank, 1).backward()
        local = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        peer = local.clone()
        dist.all_reduce(peer)
        assert not torch.equal(peer, 2 * local)  # the ranks' gradients differ: nothing reduced
        _loss(model, rank, 2).backward()
        got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.equal(got, _flat_reference(rank, 3)), f"no_sync, bucket_mb={bucket_mb}"
        reducer.remove()


def test_bucketed_reduce_equals_one_flat_all_reduce():
    spawn(_check, 2)
