"""Forward kernels: per destination, an online (base-2) softmax over its CSC edges in fp32.

Stores ``out`` in the input dtype and the log-sum-exp ``lse [N_dst, H]`` (fp32, base 2), which is
all the backward needs besides the inputs. Fused mode never forms ``e_ij``: with
``a = [edge_attr_ij, 1]``, ``q_i . e_ij = a . (W_aug q_i)`` and ``sum_j p_ij e_ij =
(sum_j p_ij a_j) W_aug``, so each destination projects ``q_i`` onto the ``d_e + 1`` rows of
``W_aug`` once and each edge costs ``O(H d_e)`` extra flops.

Launches: "flat" one (:func:`_flat_fwd_kernel`, one destination and all heads per program),
"classes" one per non-empty degree class (:func:`_fwd_kernel`); both share :func:`fwd_step`.
"""

from __future__ import annotations

import math

import torch

from squall.kernels.gt_attention import tuning
from squall.kernels.gt_attention.tuning import new

try:
    import triton
    import triton.language as tl

    from squall.kernels.gt_attention import tiles

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

LOG2E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def fwd_step(mask_e, k, v, a, q, qw, m, l_sum, acc, pa, qk_scale, FUSED: tl.constexpr):
        """Online-softmax update of ``(m, l, acc, pa)`` by one block of gathered edges.

        ``a`` is the edge term as gathered: features ``[BLOCK_E, D_PAD]`` (fused, with ``qw =
        W_aug q``) or ``e`` rows ``[BLOCK_E, BLOCK_H, C_PAD]``. ``pa`` accumulates
        ``sum_j p_ij a_j`` (fused only)."""
        if FUSED:
            s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
        else:
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
    def fwd_store(out_ptr, lse_ptr, node, acc, m, l_sum, offs_h, hmask, hc, row_mask,
                  H: tl.constexpr, HC: tl.constexpr):  # fmt: skip
        """``out = acc / l`` and base-2 ``lse``; exactly 0 for a destination with no edge."""
        has = l_sum > 0
        l_safe = tl.where(has, l_sum, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, m + tl.log2(l_safe), 0.0)
        tl.store(out_ptr + node * HC + hc, out.to(out_ptr.dtype.element_ty), mask=row_mask)
        tl.store(lse_ptr + node * H + offs_h, lse, mask=hmask)

    # ------------------------------------------------------------------------------------------
    # "flat": one launch, one destination (all heads) per program, highest degrees first
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["n_sched", "deg_key"])  # one binary for every graph
    def _flat_fwd_kernel(
        q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w_ptr, out_ptr, lse_ptr, row_ptr, sched_ptr,
        n_sched, deg_key, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, H_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """One destination per program, all heads: ``out`` and base-2 ``lse`` (``deg_key``, the
        mean degree, only keys the autotuner). Each edge step loads the next step's source ids
        before its own row gathers (one dependent load fewer per step)."""
        HC = H * C
        node, beg, end = tiles.flat_node(sched_ptr, n_sched)
        offs_h, mask_h, hc, mask_hc = tiles.all_heads(H, C, H_PAD, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
        pa = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        if FUSED:  # W_aug q: [D_PAD, H_PAD]
            qw, _qw = tiles.w_proj(
                q, q, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1, False, D_PAD, H_PAD
            )
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
            eid64, k, v, a = tiles.gather(
                eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E,
            )  # fmt: skip
            m, l_sum, acc, pa = fwd_step(mask_e, k, v, a, q, qw, m, l_sum, acc, pa, qk_scale, FUSED)
        if FUSED:
            acc = tiles.w_expand(acc, pa, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1)
        fwd_store(out_ptr, lse_ptr, node, acc, m, l_sum, offs_h, mask_h, hc, mask_hc, H, HC)

    # ------------------------------------------------------------------------------------------
    # "flat", fused: blocks of destinations, W_aug products as tensor-core products per block
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["n_sched", "deg_key"])
    def _block_fused_fwd_kernel(
        q_ptr, k_ptr, v_ptr, attr_ptr, w_ptr, b_ptr, out_ptr, lse_ptr, qw_ptr, pa_ptr, row_ptr,
        sched_ptr, n_sched, deg_key, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, D_E: tl.constexpr, D_DOT: tl.constexpr,
        H_PAD: tl.constexpr, C_PAD: tl.constexpr, C_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """``BLOCK_N`` destinations per program (consecutive slots of the schedule, highest degrees
        first), each with all heads as in the flat kernel; ``W_aug q`` before and ``(sum_j p_ij
        a_j) W_aug`` after the per-destination pass as one ``[BLOCK_N, .] x [., .]`` product per
        head (row by row per destination, these were 24 ``[H, C]`` W loads and reductions per
        destination). ``qw``, ``pa`` are ``[N, D_DOT, H]`` fp32 scratch rows of this program's
        nodes; ``out`` holds the ``v`` part until the product adds the edge part."""
        HC = H * C
        first, nodes, valid = tiles.block_nodes(sched_ptr, n_sched, BLOCK_N)
        offs_dd = tl.arange(0, D_DOT)
        offs_cd = tl.arange(0, C_DOT)
        for h in range(H):
            tiles.block_project(
                q_ptr, SQ, nodes, valid, w_ptr, b_ptr, qw_ptr, h, offs_dd, offs_cd, H, C, D_E,
                D_DOT, IEEE,
            )  # fmt: skip
        tl.debug_barrier()  # qw rows were stored by other threads of this program
        offs_h, mask_h, hc, mask_hc = tiles.all_heads(H, C, H_PAD, C_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        dh = offs_dd[:, None] * H + offs_h[None, :]
        for t in range(BLOCK_N):
            if first + t < n_sched:
                node, beg, end = tiles.block_slot(sched_ptr, n_sched, first + t)
                q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
                qw = tl.load(qw_ptr + node * (D_DOT * H) + dh, mask=mask_h[None, :], other=0.0)
                pa = tl.zeros([D_DOT, H_PAD], dtype=tl.float32)
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
                    eid64, k, v, a = tiles.gather(
                        eid, mask_e, src, k_ptr, v_ptr, q_ptr, attr_ptr, hc, mask_hc, offs_dd,
                        SKV, HC, True, D_E,
                    )  # fmt: skip
                    m, l_sum, acc, pa = fwd_step(
                        mask_e, k, v, a, q, qw, m, l_sum, acc, pa, qk_scale, True
                    )
                fwd_store(out_ptr, lse_ptr, node, acc, m, l_sum, offs_h, mask_h, hc, mask_hc, H, HC)
                l_safe = tl.where(l_sum > 0, l_sum, 1.0)
                tl.store(pa_ptr + node * (D_DOT * H) + dh, pa / l_safe[None, :],
                         mask=mask_h[None, :])  # fmt: skip
        tl.debug_barrier()  # out and pa rows were stored by other threads of this program
        for h in range(H):
            tiles.block_expand(
                pa_ptr, D_DOT, nodes, valid, w_ptr, b_ptr, out_ptr, HC, h, offs_dd, offs_cd, H, C,
                D_E, IEEE,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # "classes": one launch per degree class, DPP destinations x BLOCK_H heads per program
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _fwd_node(
        slot, order_end, sched_ptr, n_sched, q_ptr, k_ptr, v_ptr, e_ptr, attr_ptr, w3,
        out_ptr, lse_ptr, row_ptr, offs_h, offs_c, offs_d, mask_h, hc, mask_hc, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
        D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_E: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        HC = H * C
        node, beg, end, hmask, row_mask = tiles.node_slot(
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
            eid64, mask_e, k, v, a = tiles.edge_tile(
                beg, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E, BLOCK_E,
            )  # fmt: skip
            m, l_sum, acc, pa = fwd_step(mask_e, k, v, a, q, qw, m, l_sum, acc, pa, qk_scale, FUSED)
        else:
            for start in range(beg, end, BLOCK_E):
                eid64, mask_e, k, v, a = tiles.edge_tile(
                    start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV,
                    HC, FUSED, D_E, BLOCK_E,
                )  # fmt: skip
                m, l_sum, acc, pa = fwd_step(
                    mask_e, k, v, a, q, qw, m, l_sum, acc, pa, qk_scale, FUSED
                )
        if FUSED:
            acc += tl.sum(pa[:, :, None] * w3, 0)
        fwd_store(out_ptr, lse_ptr, node, acc, m, l_sum, offs_h, hmask, hc, row_mask, H, HC)

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
        offs_h, offs_c, mask_h, hc, mask_hc = tiles.head_tile(H, C, BLOCK_H, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        w3 = tiles.w_tile(w_ptr, hc, mask_hc, offs_d, H, C, FUSED, D_E)
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


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def launch_fwd(q, k, v, edge, attr, wb, row, sched, counts):
    """``(out, lse)`` of one forward: ``edge`` (materialised) or ``attr`` and ``wb = (W, b)``
    (fused, ``edge`` None); ``sched`` the destination schedule, ``counts`` its degree-class
    sizes."""
    with tuning.on_device(q):
        flat = tuning.kernel_design() == "flat"
        if flat and attr is not None and tuning.FUSED_BLOCKS:
            return _launch_block_fused(q, k, v, attr, *wb, row, sched)
        w_aug = torch.cat([wb[0], wb[1].unsqueeze(0)], 0) if attr is not None else None
        if flat:
            return _launch_flat(q, k, v, edge, attr, w_aug, row, sched)
        return _launch_classes(q, k, v, edge, attr, w_aug, row, sched, counts)


def _launch_block_fused(q, k, v, attr, weight, bias, row, sched):
    n_dst, h, c = q.shape
    h_pad, c_pad = tuning.pads(h, c)
    d_e = attr.shape[1]
    d_dot = tuning.dot_pad(d_e + 1)
    out = new(q.shape, q.dtype, q.device)
    lse = new((n_dst, h), torch.float32, q.device)
    qw = torch.empty((n_dst, d_dot, h), dtype=torch.float32, device=q.device)
    pa = torch.empty_like(qw)
    if n_dst:
        tuning.block_tuned(_block_fused_fwd_kernel, "fwd", h_pad, c_pad)[
            tuning.block_grid(n_dst)
        ](
            q, k, v, attr, weight, bias, out, lse, qw, pa, row, sched, n_dst,
            tuning.deg_key(row.shape[0], n_dst), LOG2E / math.sqrt(c), q.stride(0), k.stride(0),
            H=h, C=c, D_E=d_e, D_DOT=d_dot, H_PAD=h_pad, C_PAD=c_pad, C_DOT=tuning.dot_pad(c),
            IEEE=q.dtype == torch.float32,
        )  # fmt: skip
    return out, lse


def _launch_flat(q, k, v, edge, attr, w_aug, row, sched):
    n_dst, h, c = q.shape
    h_pad, c_pad = tuning.pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    out = new(q.shape, q.dtype, q.device)
    lse = new((n_dst, h), torch.float32, q.device)
    if n_dst:
        tuning.flat_tuned(_flat_fwd_kernel, "fwd", h_pad, c_pad, fused)[(n_dst,)](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, out, lse, row, sched, n_dst,
            tuning.deg_key(row.shape[0], n_dst), LOG2E / math.sqrt(c), q.stride(0), k.stride(0),
            H=h, C=c, FUSED=fused, D_E=d_e, D_PAD=triton.next_power_of_2(d_e + 1),
            H_PAD=h_pad, C_PAD=c_pad,
        )  # fmt: skip
    return out, lse


def _launch_classes(q, k, v, edge, attr, w_aug, row, sched, counts):
    n_dst, h, c = q.shape
    h_pad, c_pad = tuning.pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    out = new(q.shape, q.dtype, q.device)
    lse = new((n_dst, h), torch.float32, q.device)
    for cls, first, last in tuning.class_launches(counts):
        tuning.class_tuned(_fwd_kernel, "fwd", cls, h_pad, c_pad, fused)[
            tuning.class_grid(last - first, h)
        ](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, out, lse, row, sched, n_dst, first, last,
            LOG2E / math.sqrt(c), q.stride(0), k.stride(0), H=h, C=c,
            FUSED=fused, D_E=d_e, D_PAD=triton.next_power_of_2(d_e + 1), C_PAD=c_pad,
        )  # fmt: skip
    return out, lse
