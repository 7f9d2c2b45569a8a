"""Pure-PyTorch GraphTransformer attention: the ``"torch"`` backend, the tests' and the
benchmark's baseline.

Sums run per destination in CSC order through ``torch.segment_reduce``, so the result never
depends on atomic accumulation order.
"""

from __future__ import annotations

import math

import torch


def segment_ids(colptr: torch.Tensor) -> torch.Tensor:
    """Destination index of every edge from a CSC column pointer, ``[E]`` int64."""
    counts = colptr[1:] - colptr[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=colptr.device), counts)


def gt_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge: torch.Tensor,
    colptr: torch.Tensor,
    row: torch.Tensor,
    dst: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment-softmax attention in plain PyTorch; differentiable in every input.

    ``dst`` (the destination of each edge) may be passed to skip recomputing it from ``colptr``.
    Shapes and maths as in :mod:`squall.kernels.gt_attention`.
    """
    num_dst, _, channels = q.shape
    if dst is None:
        dst = segment_ids(colptr)
    keys = k.index_select(0, row) + edge
    values = v.index_select(0, row) + edge
    scores = (q.index_select(0, dst) * keys).sum(-1) * (1.0 / math.sqrt(channels))  # [E, H]
    scores = scores.float()
    with torch.no_grad():
        seg_max = torch.segment_reduce(scores, "max", offsets=colptr, axis=0)
        seg_max = torch.where(torch.isfinite(seg_max), seg_max, torch.zeros_like(seg_max))
    weights = torch.exp(scores - seg_max.index_select(0, dst))
    denom = torch.segment_reduce(weights, "sum", offsets=colptr, axis=0)  # [N_dst, H]
    weights = weights / denom.clamp_min(torch.finfo(torch.float32).tiny).index_select(0, dst)
    weighted = weights.to(values.dtype).unsqueeze(-1) * values  # [E, H, C]
    out = torch.segment_reduce(weighted, "sum", offsets=colptr, axis=0)
    return out.reshape(num_dst, *q.shape[1:])


def project_edges(edge_attr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads):
    """Materialise ``edge_attr @ weight + bias`` as ``[E, H, C]`` (the torch fused-mode path)."""
    e = edge_attr @ weight
    if bias is not None:
        e = e + bias
    return e.reshape(edge_attr.shape[0], heads, -1)
