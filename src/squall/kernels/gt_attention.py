"""GraphTransformer attention over each destination's incoming edges (CSC order).

Maths, per destination node ``i``, head ``h``, over the edges ``j -> i`` in CSC order::

    s_ij  = q_i . (k_j + e_ij) / sqrt(C)
    a_ij  = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)
    out_i = sum_j a_ij (v_j + e_ij)

A destination with no incoming edge gets ``out_i = 0``.

Shapes: ``q [N_dst, H, C]``, ``k, v [N_src, H, C]``, ``edge [E, H, C]``, ``colptr [N_dst + 1]``
(int64, ``colptr[0] = 0``, ``colptr[-1] = E``), ``row [E]`` (int64 source index of each edge, edges
grouped by destination). This file holds the pure-PyTorch reference, which is also the fallback
backend on CPU and the benchmark baseline.
"""

from __future__ import annotations

import math

import torch

from squall.kernels.edge_index import EdgeIndex


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

    Sums run per destination in CSC order through ``torch.segment_reduce``, so the result never
    depends on atomic accumulation order. ``dst`` (the destination of each edge) may be passed to
    skip recomputing it from ``colptr``.
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


def gt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge: torch.Tensor,
    index: EdgeIndex,
    backend: str = "torch",
) -> torch.Tensor:
    """Dispatch to an attention backend (``"torch"``: the reference)."""
    if backend == "torch":
        return gt_attention_reference(q, k, v, edge, index.colptr, index.row, index.dst)
    raise ValueError(f"unknown attention backend {backend!r}; choose 'torch'")
