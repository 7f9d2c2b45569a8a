"""The pure-PyTorch attention against a naive per-destination loop on hand-built graphs."""

import math

import torch

from squall.kernels.edge_index import EdgeIndex
from squall.kernels.gt_attention import gt_attention


def naive(q, k, v, e, src, dst):
    out = torch.zeros_like(q)
    for i in range(q.shape[0]):
        edges = [n for n in range(len(dst)) if dst[n] == i]
        if not edges:
            continue
        for h in range(q.shape[1]):
            scores = torch.stack([q[i, h] @ (k[src[n], h] + e[n, h]) for n in edges]) / math.sqrt(
                q.shape[2]
            )
            w = torch.softmax(scores, 0)
            out[i, h] = sum(w[j] * (v[src[n], h] + e[n, h]) for j, n in enumerate(edges))
    return out


def test_hand_built_graph_with_isolated_node():
    # 3 sources -> 4 destinations; destination 2 has no incoming edge; destination 3 has five.
    src = [0, 2, 1, 0, 1, 2, 0, 2]
    dst = [0, 0, 1, 3, 3, 3, 3, 3]
    colptr = torch.tensor([0, 2, 3, 3, 8])
    index = EdgeIndex.from_csc(colptr, torch.tensor(src), num_src=3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 3, 5, generator=g, dtype=torch.float64) for n in (4, 3, 3))
    e = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    out = gt_attention(q, k, v, e, index)
    assert torch.allclose(out, naive(q, k, v, e, src, dst), atol=1e-12)
    assert torch.equal(out[2], torch.zeros(3, 5, dtype=torch.float64))


def test_large_scores_are_stable_and_grads_flow():
    colptr = torch.tensor([0, 3])
    index = EdgeIndex.from_csc(colptr, torch.tensor([0, 1, 2]), num_src=3)
    q = torch.full((1, 1, 4), 30.0, requires_grad=True)
    k = torch.tensor([[[10.0] * 4], [[9.0] * 4], [[-5.0] * 4]], requires_grad=True)
    v = torch.randn(3, 1, 4, requires_grad=True)
    e = torch.zeros(3, 1, 4)
    out = gt_attention(q, k, v, e, index)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, 0], v[0, 0], atol=1e-4)  # softmax saturates on the largest score
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
