"""The kernels as ``torch.library`` custom ops (fake + autograd), so ``torch.compile`` traces
through them and autograd calls the backward kernels; outside torch.compile the same launchers
run through a plain ``autograd.Function`` (:func:`attention`, :func:`fused_attention`).

``squall::gt_attention_fwd`` / ``_bwd`` take the materialised edge term, ``squall::
gt_attention_fused_fwd`` / ``_bwd`` the edge features, ``W`` and ``b``. Every op takes the
graph's kernel index as tensors plus the degree-class sizes as ``list[int]`` (no host sync).
"""

from __future__ import annotations

import torch

from squall.kernels.edge_index import EdgeIndex
from squall.kernels.gt_attention.backward import launch_bwd
from squall.kernels.gt_attention.forward import launch_fwd


def kidx_args(index: EdgeIndex):
    """``(tensors, dst_counts, src_counts)`` of ``index``'s kernel view, as the ops take them:
    tensors ``(colptr, row, rowptr, csr_perm, csr_dst, dst_sched, src_sched)``."""
    ki = index.kernel
    tensors = (ki.colptr, ki.row, ki.rowptr, ki.csr_perm, ki.csr_dst, ki.dst_sched, ki.src_sched)
    return tensors, list(ki.dst_counts), list(ki.src_counts)


def _c(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x [N, H, C]`` as the kernels read q, k and v: any row stride (views of one fused
    projection, ``[N, 3 H C]`` chunked, travel without a copy), each row's ``H x C`` dense."""
    h, c = x.shape[1:]
    if x.stride(2) == 1 and (x.stride(1) == c or h == 1) and x.stride(0) >= h * c:
        return x
    return x.contiguous()


def _qkv(q, k, v):
    """q, k, v for the kernels: k and v share one row stride (else both are made contiguous)."""
    q, k, v = rows(q), rows(k), rows(v)
    if k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


@torch.library.custom_op("squall::gt_attention_fwd", mutates_args=())
def op_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edge: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Materialised-edge forward: ``(out, lse)``."""
    return launch_fwd(*_qkv(q, k, v), _c(edge), None, None, row, dst_sched, dst_counts)


@op_fwd.register_fake
def _(q, k, v, edge, colptr, row, rowptr, csr_perm, csr_dst, dst_sched, src_sched, dc, sc):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("squall::gt_attention_bwd", mutates_args=())
def op_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edge: torch.Tensor,
    lse: torch.Tensor, dout: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Materialised-edge backward: ``(dq, dk, dv, de)``."""
    kt = (row, csr_perm, csr_dst, dst_sched, src_sched)
    return launch_bwd(
        *_qkv(q, k, v), _c(edge), None, None, lse, _c(dout), kt, dst_counts, src_counts
    )


@op_bwd.register_fake
def _(q, k, v, edge, lse, dout, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(edge)


def _setup_fwd(ctx, inputs, output):
    q, k, v, edge = inputs[:4]
    ctx.index = inputs[4:11]
    ctx.counts = inputs[11:13]
    ctx.save_for_backward(q, k, v, edge, output[1])
    ctx.set_materialize_grads(False)  # lse has no gradient: no zero-filled d lse kernel


def _backward_fwd(ctx, dout, dlse):
    q, k, v, edge, lse = ctx.saved_tensors
    dq, dk, dv, de = op_bwd(q, k, v, edge, lse, dout, *ctx.index, *ctx.counts)
    return (dq, dk, dv, de) + (None,) * 9


op_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


@torch.library.custom_op("squall::gt_attention_fused_fwd", mutates_args=())
def op_fused_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fused-edge forward, ``e = attr @ weight + bias`` (``[d_e, H*C]``, ``[H*C]``):
    ``(out, lse)``."""
    wb = (_c(weight), _c(bias))
    return launch_fwd(*_qkv(q, k, v), None, _c(attr), wb, row, dst_sched, dst_counts)


@op_fused_fwd.register_fake
def _(q, k, v, attr, weight, bias, *rest):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("squall::gt_attention_fused_bwd", mutates_args=())
def op_fused_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:  # fmt: skip
    """Fused-edge backward: ``(dq, dk, dv, d_attr, d_weight, d_bias)`` (``d_weight``, ``d_bias``
    summed in fp32, stored in their parameters' dtypes)."""
    kt = (row, csr_perm, csr_dst, dst_sched, src_sched)
    return launch_bwd(
        *_qkv(q, k, v), None, _c(attr), (_c(weight), _c(bias)), lse, _c(dout), kt,
        dst_counts, src_counts,
    )  # fmt: skip


@op_fused_bwd.register_fake
def _(q, k, v, attr, weight, bias, lse, dout, *rest):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        torch.empty_like(attr),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
    )


def _setup_fused(ctx, inputs, output):
    q, k, v, attr, weight, bias = inputs[:6]
    ctx.index = inputs[6:13]
    ctx.counts = inputs[13:15]
    ctx.save_for_backward(q, k, v, attr, weight, bias, output[1])
    ctx.set_materialize_grads(False)  # lse has no gradient: no zero-filled d lse kernel


def _backward_fused(ctx, dout, dlse):
    q, k, v, attr, weight, bias, lse = ctx.saved_tensors
    grads = op_fused_bwd(q, k, v, attr, weight, bias, lse, dout, *ctx.index, *ctx.counts)
    return grads + (None,) * 9


op_fused_fwd.register_autograd(_backward_fused, setup_context=_setup_fused)


# ----------------------------------------------------------------------------------------------
# Eager calls: the same launchers through a plain autograd.Function
# ----------------------------------------------------------------------------------------------
# A custom op's Python dispatch and autograd wrapper cost the host about 2.3x what an
# autograd.Function does (materialised forward + backward with the launches stubbed out, median
# of 6 interleaved runs on a loaded 2-core host: 6.2 vs 2.7 ms), and on small graphs that host
# time exceeds the kernels' (H200, o96 decoder: 1.34 ms a forward + backward end to end for
# 0.58 ms of kernels under ncu). Outside torch.compile the
# public functions therefore take this path; inside it the custom ops above, which it traces.
def _bwd_index(tensors):
    colptr, row, rowptr, csr_perm, csr_dst, dst_sched, src_sched = tensors
    return (row, csr_perm, csr_dst, dst_sched, src_sched)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, edge, tensors, dst_counts, src_counts):
        q, k, v = _qkv(q, k, v)
        edge = _c(edge)
        out, lse = launch_fwd(q, k, v, edge, None, None, tensors[1], tensors[5], dst_counts)
        ctx.save_for_backward(q, k, v, edge, lse)
        ctx.index = (_bwd_index(tensors), dst_counts, src_counts)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, edge, lse = ctx.saved_tensors
        kt, dc, sc = ctx.index
        grads = launch_bwd(q, k, v, edge, None, None, lse, _c(dout), kt, dc, sc)
        return (*grads, None, None, None)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attr, weight, bias, tensors, dst_counts, src_counts):
        q, k, v = _qkv(q, k, v)
        attr, wb = _c(attr), (_c(weight), _c(bias))
        out, lse = launch_fwd(q, k, v, None, attr, wb, tensors[1], tensors[5], dst_counts)
        ctx.save_for_backward(q, k, v, attr, *wb, lse)
        ctx.index = (_bwd_index(tensors), dst_counts, src_counts)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, attr, weight, bias, lse = ctx.saved_tensors
        kt, dc, sc = ctx.index
        grads = launch_bwd(q, k, v, None, attr, (weight, bias), lse, _c(dout), kt, dc, sc)
        return (*grads, None, None, None)


def attention(q, k, v, edge, index: EdgeIndex) -> torch.Tensor:
    """Materialised-edge attention: the custom op under torch.compile, else the eager path."""
    tensors, dc, sc = kidx_args(index)
    if torch.compiler.is_compiling():
        return op_fwd(q, k, v, edge, *tensors, dc, sc)[0]
    return _Attention.apply(q, k, v, edge, tensors, dc, sc)


def fused_attention(q, k, v, attr, weight, bias, index: EdgeIndex) -> torch.Tensor:
    """Fused-edge attention: the custom op under torch.compile, else the eager path."""
    tensors, dc, sc = kidx_args(index)
    if torch.compiler.is_compiling():
        return op_fused_fwd(q, k, v, attr, weight, bias, *tensors, dc, sc)[0]
    return _FusedAttention.apply(q, k, v, attr, weight, bias, tensors, dc, sc)
