"""GraphTransformer attention over each destination's incoming edges (CSC order).

Maths, per destination node ``i``, head ``h``, over the edges ``j -> i`` in CSC order::

    s_ij  = q_i . (k_j + e_ij) / sqrt(C)
    a_ij  = exp(s_ij - max_j s_ij) / sum_j exp(s_ij - max_j s_ij)
    out_i = sum_j a_ij (v_j + e_ij)

A destination with no incoming edge gets ``out_i = 0``.

Shapes: ``q [N_dst, H, C]``, ``k, v [N_src, H, C]``, ``edge [E, H, C]``, ``colptr [N_dst + 1]``
(int64, ``colptr[0] = 0``, ``colptr[-1] = E``), ``row [E]`` (int64 source index of each edge, edges
grouped by destination). In fused mode the edge term is ``e_ij = edge_attr_ij @ W + b`` with
``edge_attr [E, d_e]``, ``W [d_e, H*C]``, ``b [H*C]``.

Triton kernels (``backend="triton"``)
-------------------------------------
Forward: one program per ``DPP`` destinations and ``BLOCK_H`` heads, looping over each destination's
edges in blocks of ``BLOCK_E`` with an online (base-2) softmax in fp32 (``SINGLE`` classes, whose
degree fits one block, run the destinations as a software-pipelined loop of async-copy gathers
instead); it stores ``out`` in the input dtype
and the log-sum-exp ``lse [N_dst, H]`` (fp32, base 2). Backward needs ``q, k, v, edge`` and ``lse``
only (not ``out``), with no atomics, so every gradient is bitwise identical run to run:

* per destination (CSC): recompute ``p_ij`` and ``dp_ij = dO_i . (v_j + e_ij)``; write ``p`` and
  ``p dp`` per edge (``[E, H]`` fp32) and ``delta_i = sum_j p_ij dp_ij`` (exact in fp32, unlike
  ``dO . out`` from an output rounded to bf16, which made ``dq`` 3x noisier than torch in bf16);
  ``dq_i = sum_j p_ij (dp_ij - delta_i) (k_j + e_ij) / sqrt(C)``, accumulated in one pass as
  ``sum p dp kk - delta sum p kk``;
* per source (CSR view), with ``ds_ij = p_ij dp_ij - p_ij delta_i``: ``dk_j = sum_i ds_ij q_i /
  sqrt(C)``, ``dv_j = sum_i p_ij dO_i`` and, materialised, ``de_ij = p_ij dO_i + ds_ij q_i /
  sqrt(C)`` (the same gathered ``q_i``, ``dO_i`` rows serve all three).

Fused mode never forms ``e_ij`` as a ``[H, C]`` row at all: with ``a = [edge_attr_ij, 1]`` and
``W_aug = [W; b]``, ``q_i . e_ij = a . (W_aug q_i)`` and ``sum_j p_ij e_ij = (sum_j p_ij a_j) W_aug``,
so each destination projects ``q_i`` (and ``dO_i``) onto the ``d_e + 1`` rows of ``W_aug`` once and
each edge costs ``O(H d_e)`` extra flops. Backward writes ``d edge_attr`` per edge and head block
(fp32; a second, light pass over the destination's ``p`` rows once ``delta`` is known; the head
blocks are then summed in a fixed order) and the per-destination sums
``A_i = sum_j p_ij a_j``, ``B_i = sum_j ds_ij a_j / sqrt(C)`` (``[N_dst, d_e + 1, H]``, fp32), from
which ``dW_aug = sum_i A_i dO_i + B_i q_i`` is reduced in fixed-size row chunks, then summed over
chunks in a fixed order (deterministic).

Two launch designs compute the same passes (``KERNEL_DESIGN`` / ``SQUALL_GT_KERNEL``):

* ``"flat"`` (default): one launch per pass for any degree distribution. One program per node
  holds all its heads; programs take the degree-class schedule from its end, so the highest
  degrees start first; each edge step issues the next step's edge ids before its own row gathers.
  Fused mode applies ``W_aug`` one row at a time and computes the dW chunk sums in extra programs
  of the per-source launch, summed by one more fixed-order kernel: forward 1 launch (2 fused, with
  the ``[W; b]`` concatenation), backward 2 (3 fused). Autotuned over ``(BLOCK_E, num_warps)``
  keyed on ``(H, C)`` and the mean degree.
* ``"classes"``: nodes launched per degree class (:mod:`squall.kernels.edge_index`), each class
  with its own autotuned edge block ``BLOCK_E``, nodes per program ``DPP``, heads per program
  ``BLOCK_H`` and warps, keyed on ``(H, C)`` (``d_e``, dtypes and the class's config candidates
  are compile-time); up to 14 launches a call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from squall.kernels.edge_index import DEGREE_CLASS_CAPS, EdgeIndex

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton")
LOG2E = 1.4426950408889634

# Largest edge tile (BLOCK_E * BLOCK_H * C_pad fp32 elements) per program: k, v and e tiles of
# this size stay in registers at 4 to 8 warps (sm_90 compile of the H=16, C=64 tiles with triton
# 3.9: 80 to 143 registers, no spills; the autotuner's H100 choices are all <= 2048 elements).
MAX_TILE_ELEMS = 8192
# Rows of q / dO per chunk of the deterministic dW reduction: N_dst / 512 chunks x H programs keeps
# the grid above a few thousand programs on the o96 / o320 meshes (40,962 / 163,842 rows).
DW_ROWS_PER_CHUNK = 512


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_w(w_ptr, hc, mask_hc, offs_d, HC, D_AUG: tl.constexpr):
        """``W_aug`` rows for this program's heads, ``[D_PAD, BLOCK_H, C_PAD]`` fp32 (0 past D_AUG)."""
        mask = (offs_d[:, None, None] < D_AUG) & mask_hc[None, :, :]
        w = tl.load(w_ptr + offs_d[:, None, None] * HC + hc[None, :, :], mask=mask, other=0.0)
        return w.to(tl.float32)

    @triton.jit
    def _load_attr(attr_ptr, eid, mask_e, offs_d, D_E: tl.constexpr):
        """Edge features ``[BLOCK_E, D_PAD]`` with a trailing column of ones (the bias row)."""
        a = tl.load(
            attr_ptr + eid[:, None] * D_E + offs_d[None, :],
            mask=mask_e[:, None] & (offs_d[None, :] < D_E),
            other=0.0,
        ).to(tl.float32)
        return tl.where((offs_d[None, :] == D_E) & mask_e[:, None], 1.0, a)

    @triton.jit
    def _head_tile(H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr, C_PAD: tl.constexpr):
        """This program's heads: ``offs_h``, ``offs_c``, ``mask_h`` and the ``[BLOCK_H, C_PAD]``
        row offsets ``hc`` with their mask."""
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, C_PAD)
        mask_h = offs_h < H
        hc = offs_h[:, None] * C + offs_c[None, :]
        mask_hc = mask_h[:, None] & (offs_c[None, :] < C)
        return offs_h, offs_c, mask_h, hc, mask_hc

    @triton.jit
    def _w_tile(w_ptr, hc, mask_hc, offs_d, H: tl.constexpr, C: tl.constexpr,
                FUSED: tl.constexpr, D_E: tl.constexpr):  # fmt: skip
        """``W_aug`` tile of a fused program, loaded once per program (a dummy otherwise)."""
        if FUSED:
            w3 = _load_w(w_ptr, hc, mask_hc, offs_d, H * C, D_E + 1)
        else:
            w3 = tl.zeros([1, 1, 1], dtype=tl.float32)
        return w3

    @triton.jit
    def _node_slot(slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C: tl.constexpr):
        """Node id and edge range of schedule slot ``slot``, with the row masks of its heads.

        The masks take the slot's validity as a vector (the interpreter rejects a scalar & block
        mask); node id and edge range come from the schedule rows (no dependent load)."""
        valid = slot < order_end
        hmask = mask_h & ((offs_h * 0 + slot) < order_end)
        row_mask = hmask[:, None] & (offs_c[None, :] < C)
        node = tl.load(sched_ptr + slot, mask=valid, other=0).to(tl.int64)
        beg = tl.load(sched_ptr + n_sched + slot, mask=valid, other=0)
        end = tl.load(sched_ptr + 2 * n_sched + slot, mask=valid, other=0)
        return node, beg, end, hmask, row_mask

    @triton.jit
    def _edge_tile(
        start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV,
        HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """One block of a destination's edges: ids, mask, gathered k and v rows (fp32) and the
        edge term: features ``[BLOCK_E, D_PAD]`` (fused) or ``e`` rows ``[BLOCK_E, BLOCK_H, C_PAD]``."""
        eid = start + tl.arange(0, BLOCK_E)
        mask_e = eid < end
        eid64 = eid.to(tl.int64)
        src = tl.load(row_ptr + eid, mask=mask_e, other=0).to(tl.int64)
        m3 = mask_e[:, None, None] & mask_hc[None, :, :]
        k = tl.load(k_ptr + src[:, None, None] * SKV + hc[None], mask=m3, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + src[:, None, None] * SKV + hc[None], mask=m3, other=0.0).to(tl.float32)
        if FUSED:
            edge = _load_attr(attr_ptr, eid64, mask_e, offs_d, D_E)
        else:
            edge = tl.load(e_ptr + eid64[:, None, None] * HC + hc[None], mask=m3, other=0.0)
            edge = edge.to(tl.float32)
        return eid64, mask_e, k, v, edge

    @triton.jit
    def _fwd_block(
        start, end, q, qw, m, l_sum, acc, pa,
        k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, qk_scale, SKV,
        HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """One block of a destination's edges: online-softmax update of ``(m, l, acc, pa)``."""
        eid64, mask_e, k, v, a = _edge_tile(
            start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV, HC,
            FUSED, D_E, BLOCK_E,
        )  # fmt: skip
        if FUSED:  # a: edge features
            s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
        else:  # a: the edge rows e
            v = v + a
            s = tl.sum(q[None] * (k + a), 2)
        s = tl.where(mask_e[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_sum = l_sum * alpha + tl.sum(p, 0)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 0)
        if FUSED:
            pa = pa * alpha[None, :] + tl.sum(a[:, :, None] * p[:, None, :], 0)
        return m_new, l_sum, acc, pa

    @triton.jit
    def _fwd_node(
        slot, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w3,
        out_ptr, lse_ptr, row_ptr, offs_h, offs_c, offs_d, mask_h, hc, mask_hc, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_E: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        HC = H * C
        node, beg, end, hmask, row_mask = _node_slot(
            slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C
        )
        q = tl.load(q_ptr + node * SQ + hc, mask=row_mask, other=0.0).to(tl.float32)
        m = tl.full([BLOCK_H], -1e30, tl.float32)
        l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        pa = tl.zeros([D_PAD, BLOCK_H], dtype=tl.float32)
        if FUSED:
            qw = tl.sum(q[None, :, :] * w3, 2)  # [D_PAD, BLOCK_H]
        else:
            qw = pa
        if SINGLE:  # the class guarantees degree <= BLOCK_E
            m, l_sum, acc, pa = _fwd_block(
                beg, end, q, qw, m, l_sum, acc, pa, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr,
                hc, mask_hc, offs_d, qk_scale, SKV, HC, FUSED, D_E, BLOCK_E,
            )  # fmt: skip
        else:
            for start in range(beg, end, BLOCK_E):
                m, l_sum, acc, pa = _fwd_block(
                    start, end, q, qw, m, l_sum, acc, pa, k_ptr, v_ptr, e_ptr, attr_ptr,
                    row_ptr, hc, mask_hc, offs_d, qk_scale, SKV, HC, FUSED, D_E, BLOCK_E,
                )  # fmt: skip
        if FUSED:
            acc += tl.sum(pa[:, :, None] * w3, 0)
        has = l_sum > 0
        l_safe = tl.where(has, l_sum, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, m + tl.log2(l_safe), 0.0)
        tl.store(out_ptr + node * HC + hc, out.to(out_ptr.dtype.element_ty), mask=row_mask)
        tl.store(lse_ptr + node * H + offs_h, lse, mask=hmask)

    @triton.jit
    def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w_ptr, out_ptr, lse_ptr,
        row_ptr, sched_ptr, n_sched, order_start, order_end,
        qk_scale, SQ, SKV, H: tl.constexpr, C: tl.constexpr,
        FUSED: tl.constexpr, D_E: tl.constexpr, D_PAD: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, DPP: tl.constexpr,
        SINGLE: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """``DPP`` destinations x ``BLOCK_H`` heads per program; ``out`` and base-2 ``lse``.

        ``SINGLE`` (classes whose degree fits one edge block) makes the loop over destinations a
        software-pipelined ``tl.range`` of ``STAGES`` stages: the schedule, source-index and row
        gathers of the next destinations are issued as async copies while this one computes.
        """
        offs_h, offs_c, mask_h, hc, mask_hc = _head_tile(H, C, BLOCK_H, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        w3 = _w_tile(w_ptr, hc, mask_hc, offs_d, H, C, FUSED, D_E)
        first = order_start + tl.program_id(0) * DPP
        if SINGLE:
            for t in tl.range(0, DPP, num_stages=STAGES):
                _fwd_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr,
                    attr_ptr, w3, out_ptr, lse_ptr, row_ptr, offs_h, offs_c, offs_d, mask_h, hc,
                    mask_hc, qk_scale, SQ, SKV, H, C, FUSED, D_E, D_PAD, C_PAD, BLOCK_H, BLOCK_E, True,
                )  # fmt: skip
        else:
            for t in range(DPP):
                _fwd_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr,
                    attr_ptr, w3, out_ptr, lse_ptr, row_ptr, offs_h, offs_c, offs_d, mask_h, hc,
                    mask_hc, qk_scale, SQ, SKV, H, C, FUSED, D_E, D_PAD, C_PAD, BLOCK_H, BLOCK_E, False,
                )  # fmt: skip

    @triton.jit
    def _bwd_dst_block(
        start, end, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc,
        k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, p_ptr, pdp_ptr, hc, mask_hc, offs_h, mask_h,
        offs_d, qk_scale, SKV,
        H: tl.constexpr, HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """One block of a destination's edges: ``p``, ``p dp`` out; dq / delta / A / C sums."""
        eid64, mask_e, k, v, a = _edge_tile(
            start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV, HC,
            FUSED, D_E, BLOCK_E,
        )  # fmt: skip
        if FUSED:  # a: edge features
            s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
            dp = tl.sum(do[None] * v, 2) + tl.sum(a[:, :, None] * gw[None], 1)
        else:  # a: the edge rows e
            k = k + a
            s = tl.sum(q[None] * k, 2)
            dp = tl.sum(do[None] * (v + a), 2)
        p = tl.exp2(s * qk_scale - lse[None, :])
        p = tl.where(mask_e[:, None], p, 0.0)
        pdp = p * dp
        delta += tl.sum(pdp, 0)
        x_acc += tl.sum(pdp[:, :, None] * k, 0)
        y_acc += tl.sum(p[:, :, None] * k, 0)
        ph = eid64[:, None] * H + offs_h[None, :]
        mask_eh = mask_e[:, None] & mask_h[None, :]
        tl.store(p_ptr + ph, p, mask=mask_eh)
        tl.store(pdp_ptr + ph, pdp, mask=mask_eh)
        if FUSED:
            sa += tl.sum(a[:, :, None] * p[:, None, :], 0)
            sc += tl.sum(a[:, :, None] * pdp[:, None, :], 0)
        return x_acc, y_acc, delta, sa, sc, p, pdp

    @triton.jit
    def _store_dattr(
        dattr_ptr, p, pdp, delta, gw, qw, eid64, mask_e, offs_d, n_edges, sm_scale,
        D_E: tl.constexpr,
    ):  # fmt: skip
        """``d attr_j = sum_h p G + scale (p dp - p delta) Qw`` over this program's heads, into
        its own fp32 slice ``dattr[head block, j]``."""
        ds_s = (pdp - p * delta[None, :]) * sm_scale
        da = tl.sum(p[:, None, :] * gw[None] + ds_s[:, None, :] * qw[None], 2)
        slab = tl.program_id(1).to(tl.int64) * n_edges + eid64
        mask = mask_e[:, None] & (offs_d[None, :] < D_E)
        tl.store(dattr_ptr + slab[:, None] * D_E + offs_d[None, :], da, mask=mask)

    @triton.jit
    def _bwd_dst_node(
        slot, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w3, do_ptr,
        lse_ptr, dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr, row_ptr, n_edges,
        offs_h, offs_c, offs_d, mask_h, hc, mask_hc, sm_scale, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_E: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        HC = H * C
        node, beg, end, hmask, row_mask = _node_slot(
            slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C
        )
        q = tl.load(q_ptr + node * SQ + hc, mask=row_mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + node * HC + hc, mask=row_mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + node * H + offs_h, mask=hmask, other=0.0)
        # dq = scale * sum_j p (dp - delta) kk = scale * (x_acc - delta * y_acc)
        x_acc = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        y_acc = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        delta = tl.zeros([BLOCK_H], dtype=tl.float32)
        sa = tl.zeros([D_PAD, BLOCK_H], dtype=tl.float32)
        sc = tl.zeros([D_PAD, BLOCK_H], dtype=tl.float32)
        if FUSED:
            qw = tl.sum(q[None, :, :] * w3, 2)  # [D_PAD, BLOCK_H]
            gw = tl.sum(do[None, :, :] * w3, 2)
        else:
            qw = sa
            gw = sa
        if SINGLE:
            x_acc, y_acc, delta, sa, sc, p, pdp = _bwd_dst_block(
                beg, end, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc, k_ptr, v_ptr, e_ptr,
                attr_ptr, row_ptr, p_ptr, pdp_ptr, hc, mask_hc, offs_h, mask_h, offs_d,
                qk_scale, SKV, H, HC, FUSED, D_E, BLOCK_E,
            )  # fmt: skip
        else:
            for start in range(beg, end, BLOCK_E):
                x_acc, y_acc, delta, sa, sc, p, pdp = _bwd_dst_block(
                    start, end, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc, k_ptr, v_ptr,
                    e_ptr, attr_ptr, row_ptr, p_ptr, pdp_ptr, hc, mask_hc, offs_h, mask_h,
                    offs_d, qk_scale, SKV, H, HC, FUSED, D_E, BLOCK_E,
                )  # fmt: skip
        dq = (x_acc - delta[:, None] * y_acc) * sm_scale
        tl.store(delta_ptr + node * H + offs_h, delta, mask=hmask)
        if FUSED:
            # B = scale * sum_j ds_j a_j with ds = p dp - p delta; the e-part of dq is B W_aug.
            sb = (sc - delta[None, :] * sa) * sm_scale
            dq += tl.sum(sb[:, :, None] * w3, 0)
            dh = node * (D_E + 1) * H + offs_d[:, None] * H + offs_h[None, :]
            mask_dh = (offs_d[:, None] < D_E + 1) & hmask[None, :]
            tl.store(sa_ptr + dh, sa, mask=mask_dh)
            tl.store(sb_ptr + dh, sb, mask=mask_dh)
            offs_e = tl.arange(0, BLOCK_E)
            if SINGLE:  # p, p dp of the node's only block are still in registers
                eid = beg + offs_e
                _store_dattr(
                    dattr_ptr, p, pdp, delta, gw, qw, eid.to(tl.int64), eid < end, offs_d,
                    n_edges, sm_scale, D_E,
                )  # fmt: skip
            else:
                # second pass now that delta is known: read back the p, p dp rows this program
                # wrote (barrier: other threads of the program wrote them)
                tl.debug_barrier()
                for start in range(beg, end, BLOCK_E):
                    eid = start + offs_e
                    mask_e = eid < end
                    eid64 = eid.to(tl.int64)
                    ph = eid64[:, None] * H + offs_h[None, :]
                    mask_eh = mask_e[:, None] & mask_h[None, :]
                    p = tl.load(p_ptr + ph, mask=mask_eh, other=0.0)
                    pdp = tl.load(pdp_ptr + ph, mask=mask_eh, other=0.0)
                    _store_dattr(
                        dattr_ptr, p, pdp, delta, gw, qw, eid64, mask_e, offs_d, n_edges,
                        sm_scale, D_E,
                    )  # fmt: skip
        tl.store(dq_ptr + node * HC + hc, dq.to(dq_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _bwd_dst_kernel(
        q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w_ptr, do_ptr, lse_ptr,
        dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr,
        row_ptr, sched_ptr, n_sched, order_start, order_end, n_edges,
        sm_scale, qk_scale, SQ, SKV, H: tl.constexpr, C: tl.constexpr,
        FUSED: tl.constexpr, D_E: tl.constexpr, D_PAD: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, DPP: tl.constexpr,
        SINGLE: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Per destination: ``p``, ``p * dp`` per edge, exact ``delta = sum_j p dp``, ``dq``."""
        offs_h, offs_c, mask_h, hc, mask_hc = _head_tile(H, C, BLOCK_H, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        w3 = _w_tile(w_ptr, hc, mask_hc, offs_d, H, C, FUSED, D_E)
        first = order_start + tl.program_id(0) * DPP
        if SINGLE:
            for t in tl.range(0, DPP, num_stages=STAGES):
                _bwd_dst_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr,
                    attr_ptr, w3, do_ptr, lse_ptr, dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr,
                    pdp_ptr, delta_ptr, row_ptr, n_edges, offs_h, offs_c, offs_d, mask_h, hc,
                    mask_hc, sm_scale, qk_scale, SQ, SKV, H, C, FUSED, D_E, D_PAD, C_PAD, BLOCK_H,
                    BLOCK_E, True,
                )  # fmt: skip
        else:
            for t in range(DPP):
                _bwd_dst_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr,
                    attr_ptr, w3, do_ptr, lse_ptr, dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr,
                    pdp_ptr, delta_ptr, row_ptr, n_edges, offs_h, offs_c, offs_d, mask_h, hc,
                    mask_hc, sm_scale, qk_scale, SQ, SKV, H, C, FUSED, D_E, D_PAD, C_PAD, BLOCK_H,
                    BLOCK_E, False,
                )  # fmt: skip

    @triton.jit
    def _bwd_src_block(
        start, end, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr, csr_perm_ptr,
        csr_dst_ptr, hc, mask_hc, offs_h, mask_h, sm_scale, SQ,
        H: tl.constexpr, HC: tl.constexpr, WRITE_DE: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        pos = start + tl.arange(0, BLOCK_E)
        mask_e = pos < end
        eid = tl.load(csr_perm_ptr + pos, mask=mask_e, other=0).to(tl.int64)
        dst = tl.load(csr_dst_ptr + pos, mask=mask_e, other=0).to(tl.int64)
        mask_eh = mask_e[:, None] & mask_h[None, :]
        ph = eid[:, None] * H + offs_h[None, :]
        p = tl.load(p_ptr + ph, mask=mask_eh, other=0.0)
        pdp = tl.load(pdp_ptr + ph, mask=mask_eh, other=0.0)
        dlt = tl.load(delta_ptr + dst[:, None] * H + offs_h[None, :], mask=mask_eh, other=0.0)
        ds_s = (pdp - p * dlt) * sm_scale
        m3 = mask_e[:, None, None] & mask_hc[None, :, :]
        qd = tl.load(q_ptr + dst[:, None, None] * SQ + hc[None], mask=m3, other=0.0)
        dod = tl.load(do_ptr + dst[:, None, None] * HC + hc[None], mask=m3, other=0.0)
        qd = qd.to(tl.float32)
        dod = dod.to(tl.float32)
        dk += tl.sum(ds_s[:, :, None] * qd, 0)
        dv += tl.sum(p[:, :, None] * dod, 0)
        if WRITE_DE:
            de = p[:, :, None] * dod + ds_s[:, :, None] * qd
            tl.store(
                de_ptr + eid[:, None, None] * HC + hc[None], de.to(de_ptr.dtype.element_ty), mask=m3
            )
        return dk, dv

    @triton.jit
    def _bwd_src_node(
        slot, order_end, sched_ptr, n_sched, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, dk_ptr,
        dv_ptr, de_ptr, csr_perm_ptr, csr_dst_ptr, offs_h, offs_c, mask_h, hc, mask_hc, sm_scale,
        SQ, H: tl.constexpr, C: tl.constexpr, WRITE_DE: tl.constexpr, C_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        HC = H * C
        node, beg, end, hmask, row_mask = _node_slot(
            slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C
        )
        dk = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        if SINGLE:
            dk, dv = _bwd_src_block(
                beg, end, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr, csr_perm_ptr,
                csr_dst_ptr, hc, mask_hc, offs_h, mask_h, sm_scale, SQ, H, HC, WRITE_DE, BLOCK_E,
            )  # fmt: skip
        else:
            for start in range(beg, end, BLOCK_E):
                dk, dv = _bwd_src_block(
                    start, end, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr,
                    csr_perm_ptr, csr_dst_ptr, hc, mask_hc, offs_h, mask_h, sm_scale, SQ, H, HC,
                    WRITE_DE, BLOCK_E,
                )  # fmt: skip
        tl.store(dk_ptr + node * HC + hc, dk.to(dk_ptr.dtype.element_ty), mask=row_mask)
        tl.store(dv_ptr + node * HC + hc, dv.to(dv_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _bwd_src_kernel(
        q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, dk_ptr, dv_ptr, de_ptr,
        csr_perm_ptr, csr_dst_ptr, sched_ptr, n_sched, order_start, order_end,
        sm_scale, SQ, H: tl.constexpr, C: tl.constexpr,
        WRITE_DE: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, DPP: tl.constexpr,
        SINGLE: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Per source (CSR view): ``dk``, ``dv`` and, materialised, ``de`` of each out-edge."""
        offs_h, offs_c, mask_h, hc, mask_hc = _head_tile(H, C, BLOCK_H, C_PAD)
        first = order_start + tl.program_id(0) * DPP
        if SINGLE:
            for t in tl.range(0, DPP, num_stages=STAGES):
                _bwd_src_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, do_ptr, p_ptr, pdp_ptr,
                    delta_ptr, dk_ptr, dv_ptr, de_ptr, csr_perm_ptr, csr_dst_ptr, offs_h, offs_c,
                    mask_h, hc, mask_hc, sm_scale, SQ, H, C, WRITE_DE, C_PAD, BLOCK_H, BLOCK_E, True,
                )  # fmt: skip
        else:
            for t in range(DPP):
                _bwd_src_node(
                    first + t, order_end, sched_ptr, n_sched, q_ptr, do_ptr, p_ptr, pdp_ptr,
                    delta_ptr, dk_ptr, dv_ptr, de_ptr, csr_perm_ptr, csr_dst_ptr, offs_h, offs_c,
                    mask_h, hc, mask_hc, sm_scale, SQ, H, C, WRITE_DE, C_PAD, BLOCK_H, BLOCK_E, False,
                )  # fmt: skip

    @triton.jit
    def _dw_chunk_kernel(
        sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr,
        N, H, C, ROWS, SQ,
        D_AUG: tl.constexpr, D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """``part[chunk, d, h, :] = sum_{i in chunk} sa[i, d, h] dO[i, h, :] + sb[i, d, h] q[i, h, :]``."""
        _dw_chunk(
            tl.program_id(0), tl.program_id(1), sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr,
            N, H, C, ROWS, SQ, D_AUG, D_PAD, C_PAD, BLOCK_N,
        )  # fmt: skip

    @triton.jit
    def _dw_chunk(
        chunk, h, sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr, N, H, C, ROWS, SQ,
        D_AUG: tl.constexpr, D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One ``(row chunk, head)`` slice of the dW partial sums (fixed order: deterministic)."""
        HC = H * C
        offs_d = tl.arange(0, D_PAD)
        offs_c = tl.arange(0, C_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < D_AUG
        mask_c = offs_c < C
        r_beg = chunk * ROWS
        r_end = tl.minimum(r_beg + ROWS, N)
        acc = tl.zeros([D_PAD, C_PAD], dtype=tl.float32)
        for r0 in range(r_beg, r_end, BLOCK_N):
            rows = (r0 + offs_n).to(tl.int64)
            mask_n = rows < r_end
            sd = rows[:, None] * (D_AUG * H) + offs_d[None, :] * H + h
            mask_nd = mask_n[:, None] & mask_d[None, :]
            sa = tl.load(sa_ptr + sd, mask=mask_nd, other=0.0)
            sb = tl.load(sb_ptr + sd, mask=mask_nd, other=0.0)
            xc = rows[:, None] * HC + h * C + offs_c[None, :]
            mask_nc = mask_n[:, None] & mask_c[None, :]
            do = tl.load(do_ptr + xc, mask=mask_nc, other=0.0).to(tl.float32)
            xq = rows[:, None] * SQ + h * C + offs_c[None, :]
            q = tl.load(q_ptr + xq, mask=mask_nc, other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(sa), do, input_precision="ieee")
            acc += tl.dot(tl.trans(sb), q, input_precision="ieee")
        out = part_ptr + chunk * (D_AUG * HC) + offs_d[:, None] * HC + h * C + offs_c[None, :]
        tl.store(out, acc, mask=mask_d[:, None] & mask_c[None, :])

    @triton.jit(do_not_specialize=["n_chunks", "n_cols"])
    def _sum_chunks_kernel(part_ptr, out_ptr, n_chunks, n_cols, BLOCK: tl.constexpr):
        """``out[j] = sum_c part[c, j]`` over chunks in ascending order, stored in out's dtype."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(n_chunks):
            acc += tl.load(part_ptr + c * n_cols + cols, mask=mask, other=0.0)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    # ------------------------------------------------------------------------------------------
    # "flat" design: one launch per pass for any degree distribution, one node (all heads) per
    # program, the next edge block's ids loaded while the current block's rows are in flight.
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _flat_node(sched_ptr, n_sched):
        """Node id and edge range of this program. Slots are taken from the end of the degree-class
        schedule, so the highest-degree nodes (the longest programs) start first and the launch
        ends on short ones instead of a tail of long ones."""
        slot = n_sched - 1 - tl.program_id(0)
        node = tl.load(sched_ptr + slot).to(tl.int64)
        beg = tl.load(sched_ptr + n_sched + slot)
        end = tl.load(sched_ptr + 2 * n_sched + slot)
        return node, beg, end

    @triton.jit
    def _all_heads(H: tl.constexpr, C: tl.constexpr, H_PAD: tl.constexpr, C_PAD: tl.constexpr):
        """Offsets and masks of a whole ``[H_PAD, C_PAD]`` row (every head of a node)."""
        offs_h = tl.arange(0, H_PAD)
        offs_c = tl.arange(0, C_PAD)
        mask_h = offs_h < H
        hc = offs_h[:, None] * C + offs_c[None, :]
        mask_hc = mask_h[:, None] & (offs_c[None, :] < C)
        return offs_h, mask_h, hc, mask_hc

    @triton.jit
    def _w_proj(
        x, y, w_ptr, hc, mask_hc, offs_d, HC, D_AUG: tl.constexpr, BOTH: tl.constexpr,
        D_PAD: tl.constexpr, H_PAD: tl.constexpr,
    ):  # fmt: skip
        """``sum_c x[h, c] W_aug[d, h, c]`` (and the same of ``y`` when ``BOTH``) as
        ``[D_PAD, H_PAD]``, one W row at a time: a whole ``[D_PAD, H, C]`` W tile is 128 fp32
        registers per thread at 4 warps (H 16, C 64) and spilled."""
        xw = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        yw = xw
        for d in tl.static_range(D_AUG):
            w = tl.load(w_ptr + d * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
            xw = tl.where(offs_d[:, None] == d, tl.sum(x * w, 1)[None, :], xw)
            if BOTH:
                yw = tl.where(offs_d[:, None] == d, tl.sum(y * w, 1)[None, :], yw)
        return xw, yw

    @triton.jit
    def _w_expand(acc, coef, w_ptr, hc, mask_hc, offs_d, HC, D_AUG: tl.constexpr):
        """``acc + sum_d coef[d, h] W_aug[d, h, :]``, one W row at a time."""
        for d in tl.static_range(D_AUG):
            w = tl.load(w_ptr + d * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(offs_d[:, None] == d, coef, 0.0), 0)[:, None] * w
        return acc

    @triton.jit
    def _flat_gather(
        eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV,
        HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
    ):  # fmt: skip
        """k, v rows of the block's sources and its edge term (features, or ``e`` rows), fp32."""
        eid64 = eid.to(tl.int64)
        m3 = mask_e[:, None, None] & mask_hc[None, :, :]
        kv = src.to(tl.int64)[:, None, None] * SKV + hc[None]
        k = tl.load(k_ptr + kv, mask=m3, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv, mask=m3, other=0.0).to(tl.float32)
        if FUSED:
            edge = _load_attr(attr_ptr, eid64, mask_e, offs_d, D_E)
        else:
            edge = tl.load(e_ptr + eid64[:, None, None] * HC + hc[None], mask=m3, other=0.0)
            edge = edge.to(tl.float32)
        return eid64, k, v, edge

    @triton.jit(do_not_specialize=["n_sched", "deg_key"])  # one binary for every graph
    def _flat_fwd_kernel(
        q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w_ptr, out_ptr, lse_ptr, row_ptr, sched_ptr,
        n_sched, deg_key, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, H_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """One destination per program, all heads: ``out`` and base-2 ``lse`` (``deg_key``, the
        mean degree, only keys the autotuner)."""
        HC = H * C
        node, beg, end = _flat_node(sched_ptr, n_sched)
        offs_h, mask_h, hc, mask_hc = _all_heads(H, C, H_PAD, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
        pa = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        if FUSED:  # W_aug q: [D_PAD, H_PAD]
            qw, _ = _w_proj(q, q, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1, False, D_PAD, H_PAD)
        else:
            qw = pa
        m = tl.full([H_PAD], -1e30, tl.float32)
        l_sum = tl.zeros([H_PAD], dtype=tl.float32)
        acc = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
        nxt = beg + offs_e
        src_next = tl.load(row_ptr + nxt, mask=nxt < end, other=0)
        for start in range(beg, end, BLOCK_E):
            eid = start + offs_e
            mask_e = eid < end
            src = src_next
            nxt = eid + BLOCK_E
            src_next = tl.load(row_ptr + nxt, mask=nxt < end, other=0)
            eid64, k, v, a = _flat_gather(
                eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E,
            )  # fmt: skip
            if FUSED:  # a: edge features
                s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
            else:  # a: the edge rows e
                v = v + a
                s = tl.sum(q[None] * (k + a), 2)
            s = tl.where(mask_e[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_sum = l_sum * alpha + tl.sum(p, 0)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, 0)
            if FUSED:
                pa = pa * alpha[None, :] + tl.sum(a[:, :, None] * p[:, None, :], 0)
            m = m_new
        if FUSED:
            acc = _w_expand(acc, pa, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1)
        has = l_sum > 0
        l_safe = tl.where(has, l_sum, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, m + tl.log2(l_safe), 0.0)
        tl.store(out_ptr + node * HC + hc, out.to(out_ptr.dtype.element_ty), mask=mask_hc)
        tl.store(lse_ptr + node * H + offs_h, lse, mask=mask_h)

    @triton.jit
    def _flat_store_dattr(
        dattr_ptr, p, pdp, delta, gw, qw, eid64, mask_e, offs_d, sm_scale, D_E: tl.constexpr,
    ):  # fmt: skip
        """``d attr_j = sum_h p G + scale (p dp - p delta) Qw`` over all heads, in attr's dtype."""
        ds_s = (pdp - p * delta[None, :]) * sm_scale
        da = tl.sum(p[:, None, :] * gw[None] + ds_s[:, None, :] * qw[None], 2)
        mask = mask_e[:, None] & (offs_d[None, :] < D_E)
        ptr = dattr_ptr + eid64[:, None] * D_E + offs_d[None, :]
        tl.store(ptr, da.to(dattr_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_sched", "deg_key"])
    def _flat_bwd_dst_kernel(
        q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w_ptr, do_ptr, lse_ptr,
        dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr,
        row_ptr, sched_ptr, n_sched, deg_key, sm_scale, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, H_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """Per destination, all heads: ``p``, ``p dp`` per edge, exact ``delta``, ``dq``; fused:
        ``A``, ``B`` sums and ``d edge_attr``."""
        HC = H * C
        node, beg, end = _flat_node(sched_ptr, n_sched)
        offs_h, mask_h, hc, mask_hc = _all_heads(H, C, H_PAD, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + node * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + node * H + offs_h, mask=mask_h, other=0.0)
        sa = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        sc = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        if FUSED:
            qw, gw = _w_proj(q, do, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1, True, D_PAD, H_PAD)
        else:
            qw = sa
            gw = sa
        x_acc = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
        y_acc = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
        delta = tl.zeros([H_PAD], dtype=tl.float32)
        p = tl.zeros([BLOCK_E, H_PAD], dtype=tl.float32)  # last block's, for d edge_attr
        pdp = tl.zeros([BLOCK_E, H_PAD], dtype=tl.float32)
        nxt = beg + offs_e
        src_next = tl.load(row_ptr + nxt, mask=nxt < end, other=0)
        for start in range(beg, end, BLOCK_E):
            eid = start + offs_e
            mask_e = eid < end
            src = src_next
            nxt = eid + BLOCK_E
            src_next = tl.load(row_ptr + nxt, mask=nxt < end, other=0)
            eid64, k, v, a = _flat_gather(
                eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E,
            )  # fmt: skip
            if FUSED:  # a: edge features
                s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
                dp = tl.sum(do[None] * v, 2) + tl.sum(a[:, :, None] * gw[None], 1)
            else:  # a: the edge rows e
                k = k + a
                s = tl.sum(q[None] * k, 2)
                dp = tl.sum(do[None] * (v + a), 2)
            p = tl.exp2(s * qk_scale - lse[None, :])
            p = tl.where(mask_e[:, None], p, 0.0)
            pdp = p * dp
            delta += tl.sum(pdp, 0)
            x_acc += tl.sum(pdp[:, :, None] * k, 0)
            y_acc += tl.sum(p[:, :, None] * k, 0)
            ph = eid64[:, None] * H + offs_h[None, :]
            mask_eh = mask_e[:, None] & mask_h[None, :]
            tl.store(p_ptr + ph, p, mask=mask_eh)
            tl.store(pdp_ptr + ph, pdp, mask=mask_eh)
            if FUSED:
                sa += tl.sum(a[:, :, None] * p[:, None, :], 0)
                sc += tl.sum(a[:, :, None] * pdp[:, None, :], 0)
        # dq = scale * sum_j p (dp - delta) kk = scale * (x_acc - delta * y_acc)
        dq = (x_acc - delta[:, None] * y_acc) * sm_scale
        tl.store(delta_ptr + node * H + offs_h, delta, mask=mask_h)
        if FUSED:
            # B = scale * sum_j ds_j a_j with ds = p dp - p delta; the e-part of dq is B W_aug.
            sb = (sc - delta[None, :] * sa) * sm_scale
            dq = _w_expand(dq, sb, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1)
            dh = node * (D_E + 1) * H + offs_d[:, None] * H + offs_h[None, :]
            mask_dh = (offs_d[:, None] < D_E + 1) & mask_h[None, :]
            tl.store(sa_ptr + dh, sa, mask=mask_dh)
            tl.store(sb_ptr + dh, sb, mask=mask_dh)
            if end - beg <= BLOCK_E:  # one block: its p, p dp are still in registers
                eid = beg + offs_e
                _flat_store_dattr(
                    dattr_ptr, p, pdp, delta, gw, qw, eid.to(tl.int64), eid < end, offs_d,
                    sm_scale, D_E,
                )  # fmt: skip
            else:
                # second pass now that delta is known, over the p, p dp rows this program wrote
                # (barrier: other threads of the program wrote them)
                tl.debug_barrier()
                for start in range(beg, end, BLOCK_E):
                    eid = start + offs_e
                    mask_e = eid < end
                    eid64 = eid.to(tl.int64)
                    ph = eid64[:, None] * H + offs_h[None, :]
                    mask_eh = mask_e[:, None] & mask_h[None, :]
                    p = tl.load(p_ptr + ph, mask=mask_eh, other=0.0)
                    pdp = tl.load(pdp_ptr + ph, mask=mask_eh, other=0.0)
                    _flat_store_dattr(
                        dattr_ptr, p, pdp, delta, gw, qw, eid64, mask_e, offs_d, sm_scale, D_E
                    )
        tl.store(dq_ptr + node * HC + hc, dq.to(dq_ptr.dtype.element_ty), mask=mask_hc)

    @triton.jit(do_not_specialize=["n_sched", "deg_key", "n_dst"])
    def _flat_bwd_src_kernel(
        q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, dk_ptr, dv_ptr, de_ptr,
        csr_perm_ptr, csr_dst_ptr, sched_ptr, n_sched, deg_key, sm_scale, SQ,
        sa_ptr, sb_ptr, part_ptr, n_dst, rows_per_chunk,
        H: tl.constexpr, C: tl.constexpr, WRITE_DE: tl.constexpr, H_PAD: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_E: tl.constexpr, D_AUG: tl.constexpr, D_PAD_DW: tl.constexpr,
        C_PAD_DW: tl.constexpr, DW: tl.constexpr,
    ):  # fmt: skip
        """Programs ``< n_sched``: per source (CSR view), all heads, ``dk``, ``dv`` and,
        materialised, ``de`` of each out-edge. Programs past them (fused launches only): the
        ``(row chunk, head)`` slices of the dW partial sums, which need only backward's first pass."""
        pid = tl.program_id(0)
        if pid < n_sched:
            HC = H * C
            node, beg, end = _flat_node(sched_ptr, n_sched)
            offs_h, mask_h, hc, mask_hc = _all_heads(H, C, H_PAD, C_PAD)
            offs_e = tl.arange(0, BLOCK_E)
            dk = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
            dv = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
            nxt = beg + offs_e
            eid_next = tl.load(csr_perm_ptr + nxt, mask=nxt < end, other=0)
            dst_next = tl.load(csr_dst_ptr + nxt, mask=nxt < end, other=0)
            for start in range(beg, end, BLOCK_E):
                pos = start + offs_e
                mask_e = pos < end
                eid = eid_next.to(tl.int64)
                dst = dst_next.to(tl.int64)
                nxt = pos + BLOCK_E
                eid_next = tl.load(csr_perm_ptr + nxt, mask=nxt < end, other=0)
                dst_next = tl.load(csr_dst_ptr + nxt, mask=nxt < end, other=0)
                mask_eh = mask_e[:, None] & mask_h[None, :]
                ph = eid[:, None] * H + offs_h[None, :]
                p = tl.load(p_ptr + ph, mask=mask_eh, other=0.0)
                pdp = tl.load(pdp_ptr + ph, mask=mask_eh, other=0.0)
                dlt = tl.load(
                    delta_ptr + dst[:, None] * H + offs_h[None, :], mask=mask_eh, other=0.0
                )
                ds_s = (pdp - p * dlt) * sm_scale
                m3 = mask_e[:, None, None] & mask_hc[None, :, :]
                qd = tl.load(q_ptr + dst[:, None, None] * SQ + hc[None], mask=m3, other=0.0)
                dod = tl.load(do_ptr + dst[:, None, None] * HC + hc[None], mask=m3, other=0.0)
                qd = qd.to(tl.float32)
                dod = dod.to(tl.float32)
                dk += tl.sum(ds_s[:, :, None] * qd, 0)
                dv += tl.sum(p[:, :, None] * dod, 0)
                if WRITE_DE:
                    de = p[:, :, None] * dod + ds_s[:, :, None] * qd
                    de_at = de_ptr + eid[:, None, None] * HC + hc[None]
                    tl.store(de_at, de.to(de_ptr.dtype.element_ty), mask=m3)
            tl.store(dk_ptr + node * HC + hc, dk.to(dk_ptr.dtype.element_ty), mask=mask_hc)
            tl.store(dv_ptr + node * HC + hc, dv.to(dv_ptr.dtype.element_ty), mask=mask_hc)
        elif DW:  # compiled into fused launches only (sa, sb are fp32 there)
            idx = pid - n_sched
            _dw_chunk(
                idx // H, idx % H, sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr, n_dst, H, C,
                rows_per_chunk, SQ, D_AUG, D_PAD_DW, C_PAD_DW, 32,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launch configurations and host launchers
# ----------------------------------------------------------------------------------------------
def _class_configs(kernel: str, cls: int, h_pad: int, c_pad: int, fused: bool) -> list:
    """Candidate ``(BLOCK_E, DPP, BLOCK_H, num_warps, SINGLE, STAGES)`` for one degree class.

    The class cap (4, 8, 16 edges; 32 for the open class) bounds the edge block; ``MAX_TILE_ELEMS``
    bounds ``BLOCK_E * BLOCK_H * C_pad``. Candidates: all, half or a quarter of the heads per
    program (H100 v1 run: all-heads tiles at 8 warps left 2 programs per SM and h_to_h at 2.4x the
    no-reuse gather time; v2 autotune on o96 era_to_h chose a quarter or half of the heads, 4
    warps, 4 nodes per program in class 0; v3: a quarter of the heads, 8-edge blocks, 4 warps
    in classes 1 to 3 on every graph). Classes 0 and 1 (degree <= cap) also get ``SINGLE``
    programs: many destinations per program in a software-pipelined loop, one edge block each
    (v2 ncu on o96 h_to_h: 12 to 25 % occupancy, DRAM 10 to 29 % busy: the schedule -> source ids
    -> rows chain of dependent loads is exposed; pipelining issues the next nodes' chains early).
    profiling/NOTES_attention.md lists what the autotuner chose per graph.
    """
    cap = DEGREE_CLASS_CAPS[cls] if cls < len(DEGREE_CLASS_CAPS) else 2 * DEGREE_CLASS_CAPS[-1]
    quarter, half = max(1, h_pad // 4), max(1, h_pad // 2)
    cands = []
    # all heads per program: never chosen above class 0 on the H100 (v3), so only offered there
    for bh in dict.fromkeys([h_pad, quarter, half] if cls == 0 else [quarter, half]):
        fit = max(2, MAX_TILE_ELEMS // (bh * c_pad))
        be = min(cap, 1 << (fit.bit_length() - 1))
        warps = 4 if be * bh * c_pad <= 4096 else 8
        for dpp in (2, 4) if cls == 0 else (1,) if bh != quarter else (1, 2):
            cands.append((be, dpp, bh, warps, False, 1))
        if cls <= 1 and be >= cap and bh != h_pad:
            # 16 nodes, 3 stages: chosen on H100 for o96 h_to_era and o320 classes 0 and 1 (v3
            # autotune); 32 nodes / 4 stages was never chosen and was dropped
            cands.append((be, 16, bh, warps, True, 3))
    if cls >= 2:
        # high-degree classes: the class-1 tile looping over more blocks (H100 v2 ncu, o96 h_to_h:
        # the 32-edge 8-warp tile ran 1 program per SM, 12.5% occupancy, class 3 at 525 us)
        be = min(8, max(2, MAX_TILE_ELEMS // (quarter * c_pad)))
        cands.append((be, 1, quarter, 4, False, 1))
    # One- and two-warp programs: no cross-warp reduction, so no barrier in a node's chain (sm_90
    # SASS of the H16 C64 8-edge tile: 17 BAR at 4 warps, 13 at 2, 0 at 1 warp with 2 heads, 80
    # registers), and ~4x the independent node chains per SM. Not yet timed on a GPU.
    for bh, warps in ((max(1, h_pad // 8), 1), (quarter, 2)):
        fit = max(2, 32 * 32 * warps // (bh * c_pad))  # <= 32 fp32 per thread and tile
        be = min(cap, 8, 1 << (fit.bit_length() - 1))
        cands.append((be, 2 if cls == 0 else 1, bh, warps, False, 1))
    if FORCE_CANDIDATE is not None:
        return [cands[FORCE_CANDIDATE % len(cands)]]
    if _interpreting() or os.environ.get("SQUALL_AUTOTUNE", "1") == "0":
        return cands[:1]  # the interpreter cannot time; SQUALL_AUTOTUNE=0 skips tuning compiles
    return cands


def _head_blocks_max(h: int, h_pad: int, c_pad: int) -> int:
    """Most head blocks any fused backward candidate launches (slices of the d edge_attr buffer)."""
    return max(
        triton.cdiv(h, cand[2])
        for cls in range(len(DEGREE_CLASS_CAPS) + 1)
        for cand in _class_configs("bwd_dst", cls, h_pad, c_pad, True)
    )


# Run one candidate of every class instead of autotuning (tests; ncu runs through the environment).
FORCE_CANDIDATE: int | None = (
    int(os.environ["SQUALL_FORCE_CANDIDATE"]) if "SQUALL_FORCE_CANDIDATE" in os.environ else None
)
_TUNED: dict = {}


def _tuned(kernel: str, cls: int, h_pad: int, c_pad: int, fused: bool):
    """Autotuned wrapper of one kernel for one degree class (candidates fixed per class)."""
    cands = tuple(_class_configs(kernel, cls, h_pad, c_pad, fused))
    key = (kernel, cls, cands, fused)
    if key not in _TUNED:
        fn = {"fwd": _fwd_kernel, "bwd_dst": _bwd_dst_kernel, "bwd_src": _bwd_src_kernel}[kernel]
        configs = [
            triton.Config(
                {"BLOCK_E": be, "DPP": dpp, "BLOCK_H": bh, "SINGLE": one, "STAGES": st},
                num_warps=w,
            )
            for be, dpp, bh, w, one, st in cands
        ]
        _TUNED[key] = triton.autotune(configs=configs, key=["H", "C"])(fn)
    return _TUNED[key]


# Kernel design: "flat" (one launch per pass: one node and all heads per program, the highest
# degrees first; the default: on one H200, 2.4x / 2.0x faster than "classes" materialised / fused
# on the o96 encoder in the same call, 1.2 to 2.7x below the classes times of issue 15's table on
# the other graphs; results/attention_vs_anemoi.md) or "classes" (per degree class launches, head
# blocks, autotuned per class). Read at every call, so a process may switch; both designs save the
# same state (base-2 lse).
KERNEL_DESIGNS = ("classes", "flat")
KERNEL_DESIGN = os.environ.get("SQUALL_GT_KERNEL", "flat")


def kernel_design() -> str:
    """The design the Triton backend launches now (``SQUALL_GT_KERNEL`` or ``KERNEL_DESIGN``)."""
    if KERNEL_DESIGN not in KERNEL_DESIGNS:
        raise ValueError(
            f"unknown attention kernel design {KERNEL_DESIGN!r}; choose one of {KERNEL_DESIGNS}"
        )
    return KERNEL_DESIGN


def _flat_configs(h_pad: int, c_pad: int) -> list[tuple[int, int]]:
    """Candidate ``(BLOCK_E, num_warps)`` of the flat kernels (one list for every pass).

    A block's k, v and e tiles are ``3 BLOCK_E H_pad C_pad`` fp32 values spread over the
    program's threads; ``MAX_TILE_ELEMS`` keeps them in registers. H200 autotune over the six
    AIFS graphs, bf16 and fp16 (profiling/results/attention_vs_anemoi_run2.log): one edge per step
    in 64 of 72 choices (2 warps in 43), two edges in the rest: more programs per SM beat more
    gathers per program. Larger blocks stay for graphs where they win. The interpreter takes
    blocks of 4 (a quarter of the interpreted loop steps; same arithmetic).
    """
    tile = h_pad * c_pad
    cands = [
        (be, w) for be, w in ((1, 4), (2, 4), (4, 4), (1, 2), (8, 8)) if be * tile <= MAX_TILE_ELEMS
    ]
    if not cands:  # one [H, C] row alone exceeds the tile budget: one edge at a time
        cands = [(1, 8)]
    if FORCE_CANDIDATE is not None:
        return [cands[FORCE_CANDIDATE % len(cands)]]
    if _interpreting():
        return [max((c for c in cands if c[0] <= 4), key=lambda c: c[0])]
    if os.environ.get("SQUALL_AUTOTUNE", "1") == "0":
        return cands[:1]
    return cands


def _flat_tuned(kernel: str, h_pad: int, c_pad: int, fused: bool):
    """Autotuned flat kernel, keyed on ``(H, C, deg_key)`` (deg_key: the mean degree, from shapes)."""
    cands = tuple(_flat_configs(h_pad, c_pad))
    key = ("flat_" + kernel, -1, cands, fused)
    if key not in _TUNED:
        fn = {
            "fwd": _flat_fwd_kernel, "bwd_dst": _flat_bwd_dst_kernel,
            "bwd_src": _flat_bwd_src_kernel,
        }[kernel]  # fmt: skip
        configs = [triton.Config({"BLOCK_E": be}, num_warps=w) for be, w in cands]
        _TUNED[key] = triton.autotune(configs=configs, key=["H", "C", "deg_key"])(fn)
    return _TUNED[key]


def _deg_key(n_edges: int, n_nodes: int) -> int:
    """Mean degree, rounded: graphs of different degree get their own tuning (no host sync)."""
    return max(1, round(n_edges / max(1, n_nodes)))


def _flat_fwd(q, k, v, edge, attr, w_aug, row, sched):
    """Forward of the flat design: one launch, ``(out, lse)``."""
    n_dst, h, c = q.shape
    h_pad, c_pad = _pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    out = _new(q.shape, q.dtype, q.device)
    lse = _new((n_dst, h), torch.float32, q.device)
    if n_dst:
        _flat_tuned("fwd", h_pad, c_pad, fused)[(n_dst,)](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, out, lse, row, sched, n_dst,
            _deg_key(row.shape[0], n_dst), LOG2E / math.sqrt(c), q.stride(0), k.stride(0),
            H=h, C=c, FUSED=fused, D_E=d_e, D_PAD=triton.next_power_of_2(d_e + 1),
            H_PAD=h_pad, C_PAD=c_pad,
        )  # fmt: skip
    return out, lse


def _flat_bwd(q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors):
    """Backward of the flat design: two launches (three fused: the dW chunk sums)."""
    row, csr_perm, csr_dst, dst_sched, src_sched = kidx_tensors
    n_dst, h, c = q.shape
    n_src = k.shape[0]
    n_edges = row.shape[0]
    h_pad, c_pad = _pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    d_pad = triton.next_power_of_2(d_e + 1)
    dev = q.device
    f32 = torch.float32
    dq = _new(q.shape, q.dtype, dev)
    p = _new((n_edges, h), f32, dev)
    pdp = _new((n_edges, h), f32, dev)
    delta = _new((n_dst, h), f32, dev)
    if fused:
        de = _new(0, f32, dev)
        dattr = _new(attr.shape, attr.dtype, dev)
        sa = _new((n_dst, d_e + 1, h), f32, dev)
        sb = _new_like(sa)
    else:
        de = _new_like(edge)
        dattr = sa = sb = de
    sm_scale = 1.0 / math.sqrt(c)
    if n_dst:
        _flat_tuned("bwd_dst", h_pad, c_pad, fused)[(n_dst,)](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, dout, lse, dq, dattr, sa, sb, p, pdp, delta,
            row, dst_sched, n_dst, _deg_key(n_edges, n_dst), sm_scale, sm_scale * LOG2E,
            q.stride(0), k.stride(0), H=h, C=c, FUSED=fused, D_E=d_e, D_PAD=d_pad,
            H_PAD=h_pad, C_PAD=c_pad,
        )  # fmt: skip
    dk = _new(k.shape, k.dtype, dev)
    dv = _new(v.shape, v.dtype, dev)
    n_chunks = triton.cdiv(n_dst, DW_ROWS_PER_CHUNK) if fused else 0
    part = _new((n_chunks, d_e + 1, h * c), f32, dev) if fused else de
    if n_src + n_chunks * h:
        _flat_tuned("bwd_src", h_pad, c_pad, fused)[(n_src + n_chunks * h,)](
            q, dout, p, pdp, delta, dk, dv, de, csr_perm, csr_dst, src_sched, n_src,
            _deg_key(n_edges, n_src), sm_scale, q.stride(0), sa, sb, part, n_dst,
            DW_ROWS_PER_CHUNK, H=h, C=c, WRITE_DE=not fused, H_PAD=h_pad, C_PAD=c_pad,
            D_AUG=d_e + 1, D_PAD_DW=max(16, d_pad), C_PAD_DW=max(16, c_pad), DW=fused,
        )  # fmt: skip
    if not fused:
        return dq, dk, dv, de
    dw_aug = _new(w_aug.shape, w_aug.dtype, dev)
    n_cols = dw_aug.numel()
    _sum_chunks_kernel[(triton.cdiv(n_cols, 1024),)](part, dw_aug, n_chunks, n_cols, BLOCK=1024)
    return dq, dk, dv, dattr, dw_aug


def _pads(h: int, c: int) -> tuple[int, int]:
    return triton.next_power_of_2(h), triton.next_power_of_2(c)


def _class_launches(counts: list[int]):
    """Yield ``(class, first slot, one-past-last slot)`` for every non-empty degree class."""
    start = 0
    for cls, n in enumerate(counts):
        if n:
            yield cls, start, start + n
        start += n


def _grid(n: int, h: int):
    return lambda meta: (triton.cdiv(n, meta["DPP"]), triton.cdiv(h, meta["BLOCK_H"]))


# Tests set this to fill every kernel output with NaN before launch, so an element a kernel fails
# to write shows up as NaN (never left on in production: it costs one extra write per output).
POISON_OUTPUTS = False


def _new(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS and t.is_floating_point() else t


def _new_like(x: torch.Tensor) -> torch.Tensor:
    return _new(x.shape, x.dtype, x.device)


def _on_device(x: torch.Tensor):
    """Launch on the tensors' GPU whatever the current device is (one process, several GPUs)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _launch_fwd(q, k, v, edge, attr, w_aug, row, sched, counts):
    with _on_device(q):
        return _launch_fwd_here(q, k, v, edge, attr, w_aug, row, sched, counts)


def _launch_bwd(q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors, dst_counts, src_counts):
    with _on_device(q):
        return _launch_bwd_here(
            q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors, dst_counts, src_counts
        )


def _launch_fwd_here(q, k, v, edge, attr, w_aug, row, sched, counts):
    if kernel_design() == "flat":
        return _flat_fwd(q, k, v, edge, attr, w_aug, row, sched)
    n_dst, h, c = q.shape
    h_pad, c_pad = _pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    out = _new(q.shape, q.dtype, q.device)
    lse = _new((n_dst, h), torch.float32, q.device)
    for cls, first, last in _class_launches(counts):
        _tuned("fwd", cls, h_pad, c_pad, fused)[_grid(last - first, h)](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, out, lse, row, sched, n_dst, first, last,
            LOG2E / math.sqrt(c), q.stride(0), k.stride(0), H=h, C=c,
            FUSED=fused, D_E=d_e, D_PAD=triton.next_power_of_2(d_e + 1), C_PAD=c_pad,
        )  # fmt: skip
    return out, lse


def _launch_bwd_here(q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors, dst_counts, src_counts):
    if kernel_design() == "flat":
        return _flat_bwd(q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors)
    row, csr_perm, csr_dst, dst_sched, src_sched = kidx_tensors
    n_dst, h, c = q.shape
    n_src = k.shape[0]
    n_edges = row.shape[0]
    h_pad, c_pad = _pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    d_pad = triton.next_power_of_2(d_e + 1)
    dev = q.device
    f32 = torch.float32
    dq = _new(q.shape, q.dtype, dev)
    p = _new((n_edges, h), f32, dev)
    pdp = _new((n_edges, h), f32, dev)
    delta = _new((n_dst, h), f32, dev)
    if fused:
        de = _new(0, f32, dev)
        # d edge_attr per head block, summed below in a fixed order; zeroed because the head
        # blocks a class uses depend on the config its autotuner picks (unused slices stay 0).
        dattr = torch.zeros(
            (_head_blocks_max(h, h_pad, c_pad), n_edges, d_e), dtype=f32, device=dev
        )
        sa = _new((n_dst, d_e + 1, h), f32, dev)
        sb = _new_like(sa)
    else:
        de = _new_like(edge)
        dattr = sa = sb = de
    sm_scale = 1.0 / math.sqrt(c)
    for cls, first, last in _class_launches(dst_counts):
        _tuned("bwd_dst", cls, h_pad, c_pad, fused)[_grid(last - first, h)](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, dout, lse,
            dq, dattr, sa, sb, p, pdp, delta,
            row, dst_sched, n_dst, first, last, n_edges,
            sm_scale, sm_scale * LOG2E, q.stride(0), k.stride(0), H=h, C=c,
            FUSED=fused, D_E=d_e, D_PAD=d_pad, C_PAD=c_pad,
        )  # fmt: skip
    dk = _new(k.shape, k.dtype, dev)
    dv = _new(v.shape, v.dtype, dev)
    for cls, first, last in _class_launches(src_counts):
        _tuned("bwd_src", cls, h_pad, c_pad, fused)[_grid(last - first, h)](
            q, dout, p, pdp, delta, dk, dv, de, csr_perm, csr_dst, src_sched, n_src, first, last,
            sm_scale, q.stride(0), H=h, C=c, WRITE_DE=not fused, C_PAD=c_pad,
        )  # fmt: skip
    if not fused:
        return dq, dk, dv, de
    n_chunks = max(1, triton.cdiv(n_dst, DW_ROWS_PER_CHUNK))
    part = _new((n_chunks, d_e + 1, h * c), dtype=torch.float32, device=dev)
    _dw_chunk_kernel[(n_chunks, h)](
        sa, sb, q, dout, part, n_dst, h, c, DW_ROWS_PER_CHUNK, q.stride(0),
        D_AUG=d_e + 1, D_PAD=max(16, d_pad), C_PAD=max(16, c_pad), BLOCK_N=32,
        num_warps=4,
    )  # fmt: skip
    dw_aug = part.sum(0).to(w_aug.dtype)
    return dq, dk, dv, dattr.sum(0).to(attr.dtype), dw_aug


def _kidx_args(index: EdgeIndex):
    ki = index.kernel
    tensors = (ki.colptr, ki.row, ki.rowptr, ki.csr_perm, ki.csr_dst, ki.dst_sched, ki.src_sched)
    return tensors, list(ki.dst_counts), list(ki.src_counts)


# ----------------------------------------------------------------------------------------------
# Custom ops (fake + autograd)
# ----------------------------------------------------------------------------------------------
def _c(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [N, H, C]`` as the kernels read q, k and v: any row stride (views of one fused
    projection, ``[N, 3 H C]`` chunked, travel without a copy), each row's ``H x C`` dense."""
    h, c = x.shape[1:]
    if x.stride(2) == 1 and (x.stride(1) == c or h == 1) and x.stride(0) >= h * c:
        return x
    return x.contiguous()


def _qkv(q, k, v):
    """q, k, v for the kernels: k and v share one row stride (else both are made contiguous)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    if k.stride(0) != v.stride(0):
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


@torch.library.custom_op("squall::gt_attention_fwd", mutates_args=())
def _op_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edge: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Materialised-edge forward: ``(out, lse)``."""
    return _launch_fwd(*_qkv(q, k, v), _c(edge), None, None, row, dst_sched, dst_counts)


@_op_fwd.register_fake
def _(q, k, v, edge, colptr, row, rowptr, csr_perm, csr_dst, dst_sched, src_sched, dc, sc):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("squall::gt_attention_bwd", mutates_args=())
def _op_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edge: torch.Tensor,
    lse: torch.Tensor, dout: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Materialised-edge backward: ``(dq, dk, dv, de)``."""
    kt = (row, csr_perm, csr_dst, dst_sched, src_sched)
    return _launch_bwd(
        *_qkv(q, k, v), _c(edge), None, None, lse, _c(dout), kt, dst_counts, src_counts
    )


@_op_bwd.register_fake
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
    dq, dk, dv, de = _op_bwd(q, k, v, edge, lse, dout, *ctx.index, *ctx.counts)
    return (dq, dk, dv, de) + (None,) * 9


_op_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


@torch.library.custom_op("squall::gt_attention_fused_fwd", mutates_args=())
def _op_fused_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr: torch.Tensor, w_aug: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fused-edge forward, ``w_aug = [W; b]`` of shape ``[d_e + 1, H*C]``: ``(out, lse)``."""
    return _launch_fwd(*_qkv(q, k, v), None, _c(attr), _c(w_aug), row, dst_sched, dst_counts)


@_op_fused_fwd.register_fake
def _(q, k, v, attr, w_aug, *rest):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("squall::gt_attention_fused_bwd", mutates_args=())
def _op_fused_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attr: torch.Tensor, w_aug: torch.Tensor,
    lse: torch.Tensor, dout: torch.Tensor,
    colptr: torch.Tensor, row: torch.Tensor, rowptr: torch.Tensor, csr_perm: torch.Tensor,
    csr_dst: torch.Tensor, dst_sched: torch.Tensor, src_sched: torch.Tensor,
    dst_counts: list[int], src_counts: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fused-edge backward: ``(dq, dk, dv, d_attr, dw_aug)`` (``dw_aug`` summed in fp32, stored
    in ``w_aug``'s dtype)."""
    kt = (row, csr_perm, csr_dst, dst_sched, src_sched)
    return _launch_bwd(
        *_qkv(q, k, v), None, _c(attr), _c(w_aug), lse, _c(dout), kt,
        dst_counts, src_counts,
    )  # fmt: skip


@_op_fused_bwd.register_fake
def _(q, k, v, attr, w_aug, lse, dout, *rest):
    dw = w_aug.new_empty(w_aug.shape)
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        torch.empty_like(attr),
        dw,
    )


def _setup_fused(ctx, inputs, output):
    q, k, v, attr, w_aug = inputs[:5]
    ctx.index = inputs[5:12]
    ctx.counts = inputs[12:14]
    ctx.save_for_backward(q, k, v, attr, w_aug, output[1])
    ctx.set_materialize_grads(False)  # lse has no gradient: no zero-filled d lse kernel


def _backward_fused(ctx, dout, dlse):
    q, k, v, attr, w_aug, lse = ctx.saved_tensors
    dq, dk, dv, dattr, dw = _op_fused_bwd(q, k, v, attr, w_aug, lse, dout, *ctx.index, *ctx.counts)
    return (dq, dk, dv, dattr, dw) + (None,) * 9


_op_fused_fwd.register_autograd(_backward_fused, setup_context=_setup_fused)


# ----------------------------------------------------------------------------------------------
# Public API and reference
# ----------------------------------------------------------------------------------------------
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
    if HAS_TRITON and (device.type == "cuda" or _interpreting()):
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


def project_edges(edge_attr: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads):
    """Materialise ``edge_attr @ weight + bias`` as ``[E, H, C]`` (the torch fused-mode path)."""
    e = edge_attr @ weight
    if bias is not None:
        e = e + bias
    return e.reshape(edge_attr.shape[0], heads, -1)


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
    tensors, dc, sc = _kidx_args(index)
    return _op_fwd(q, k, v, edge, *tensors, dc, sc)[0]


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
    w_aug = torch.cat([weight, bias.unsqueeze(0)], 0)
    tensors, dc, sc = _kidx_args(index)
    return _op_fused_fwd(q, k, v, edge_attr, w_aug, *tensors, dc, sc)[0]
