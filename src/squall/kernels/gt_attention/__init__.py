"""GraphTransformer attention over each destination's incoming edges (CSC order).

Maths, per destination node ``i``, head ``h``, over the edges ``j -> i`` in CSC order::

    s_ij  = q_i . (k_j + e_ij) / sqrt(C)
    a_ij  = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)
    out_i = sum_j a_ij (v_j + e_ij)

A destination with no incoming edge gets ``out_i = 0``.

Shapes: ``q [N_dst, H, C]``, ``k, v [N_src, H, C]``, ``edge [E, H, C]``, ``colptr [N_dst + 1]``
(int64, ``colptr[0] = 0``, ``colptr[-1] = E``), ``row [E]`` (int64 source index of each edge, edges
grouped by destination). In fused mode the edge term is ``e_ij = edge_attr_ij @ W + b`` with
``edge_attr [E, d_e]``, ``W [d_e, H*C]``, ``b [H*C]``; the Triton kernels never form it.

Where things are:

* :mod:`.reference` -- the pure-PyTorch attention (``backend="torch"``, the tests' baseline);
* :mod:`.forward` -- forward kernels (online softmax, ``out`` and base-2 ``lse``) and launcher;
* :mod:`.backward` -- backward kernels (destination pass, source pass, dW reduction) and launcher;
* :mod:`.tiles` -- tile offsets, gathers and ``W_aug`` products both passes share;
* :mod:`.tuning` -- kernel design switch, autotune candidates, grids, output buffers;
* :mod:`.op` -- the ``torch.library`` custom ops (fake + autograd; what torch.compile traces) and
  the eager path through an ``autograd.Function`` (less host time per call);
* this module -- the public functions and the backend choice.
"""

from __future__ import annotations

import logging

import torch

from squall.kernels.edge_index import EdgeIndex
from squall.kernels.gt_attention import op, tuning
from squall.kernels.gt_attention.reference import (
    gt_attention_reference,
    project_edges,
    segment_ids,
)
from squall.kernels.gt_attention.tuning import HAS_TRITON, KERNEL_DESIGNS, kernel_design

__all__ = [
    "BACKENDS",
    "HAS_TRITON",
    "KERNEL_DESIGNS",
    "gt_attention",
    "gt_attention_fused",
    "gt_attention_reference",
    "kernel_design",
    "project_edges",
    "resolve_backend",
    "segment_ids",
]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")
_FELL_BACK = False


def resolve_backend(backend: str, device: torch.device | str) -> tuple[str, str]:
    """The backend that runs for tensors on ``device`` when ``backend`` is asked for, and why it
    differs (``""`` when it does not): ``triton`` needs triton and a CUDA device, or the
    interpreter (``TRITON_INTERPRET=1``); otherwise the torch reference runs.

    Raises
    ------
    ValueError
        If ``backend`` is not one of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch", ""
    device = torch.device(device)
    if HAS_TRITON and (device.type == "cuda" or tuning.interpreting()):
        return "triton", ""
    return "torch", "triton is not installed" if not HAS_TRITON else f"tensors are on {device}"


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    global _FELL_BACK
    used, why = resolve_backend(backend, q.device)
    if used == "triton":
        return True
    if why and not _FELL_BACK:
        log.info("gt_attention: backend 'triton' falls back to the torch reference (%s)", why)
        _FELL_BACK = True
    return False


def gt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge: torch.Tensor,
    index: EdgeIndex,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention with a materialised edge term ``edge [E, H, C]``.

    Parameters
    ----------
    q, k, v, edge : torch.Tensor
        ``[N_dst, H, C]``, ``[N_src, H, C]`` (twice) and ``[E, H, C]``, one float dtype.
    index : EdgeIndex
        The graph's CSC/CSR views and kernel schedule, on the tensors' device.
    backend : {"torch", "triton"}
        ``"triton"`` on CPU tensors (without ``TRITON_INTERPRET=1``) runs the reference.

    Returns
    -------
    torch.Tensor
        ``[N_dst, H, C]`` in the input dtype.
    """
    if not _use_triton(q, backend):
        return gt_attention_reference(q, k, v, edge, index.colptr, index.row, index.dst)
    return op.attention(q, k, v, edge, index)


def gt_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    edge_attr: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: EdgeIndex,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention with the edge term ``e = edge_attr @ weight + bias`` formed inside the kernel.

    Parameters
    ----------
    q, k, v : torch.Tensor
        As in :func:`gt_attention`.
    edge_attr : torch.Tensor
        ``[E, d_e]`` edge features in CSC order (may require grad).
    weight, bias : torch.Tensor
        ``[d_e, H*C]`` and ``[H*C]`` (``bias`` may be ``None``).
    index : EdgeIndex
        The graph's views and kernel schedule.
    backend : {"torch", "triton"}
        ``"torch"`` materialises ``[E, H, C]`` and runs the reference; ``"triton"`` never does.

    Returns
    -------
    torch.Tensor
        ``[N_dst, H, C]`` in the dtype of ``q``.
    """
    heads = q.shape[1]
    if not _use_triton(q, backend):
        edge = project_edges(edge_attr, weight, bias, heads).to(q.dtype)
        return gt_attention_reference(q, k, v, edge, index.colptr, index.row, index.dst)
    if bias is None:
        bias = weight.new_zeros(weight.shape[1])
    return op.fused_attention(q, k, v, edge_attr, weight, bias, index)
