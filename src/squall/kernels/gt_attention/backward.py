"""Backward kernels: two passes (destination, then source) and, fused, the dW reduction.

Backward needs ``q, k, v, edge`` and the forward's ``lse`` only (not ``out``), with no atomics, so
every gradient is bitwise identical run to run:

* per destination (CSC): recompute ``p_ij`` and ``dp_ij = dO_i . (v_j + e_ij)``; write ``p`` and
  ``p dp`` per edge (``[E, H]`` fp32) and ``delta_i = sum_j p_ij dp_ij`` (exact in fp32, unlike
  ``dO . out`` from an output rounded to bf16, which made ``dq`` 3x noisier than torch in bf16);
  ``dq_i = sum_j p_ij (dp_ij - delta_i) (k_j + e_ij) / sqrt(C)``, accumulated in one pass as
  ``sum p dp kk - delta sum p kk``;
* per source (CSR view), with ``ds_ij = p_ij dp_ij - p_ij delta_i``: ``dk_j = sum_i ds_ij q_i /
  sqrt(C)``, ``dv_j = sum_i p_ij dO_i`` and, materialised, ``de_ij = p_ij dO_i + ds_ij q_i /
  sqrt(C)`` (the same gathered ``q_i``, ``dO_i`` rows serve all three).

Fused, the destination pass also writes ``d edge_attr`` per edge (a second, light pass over the
destination's ``p`` rows once ``delta`` is known, unless they all fit one edge block) and the
per-destination sums ``A_i = sum_j p_ij a_j``, ``B_i = sum_j ds_ij a_j / sqrt(C)``
(``[N_dst, d_e + 1, H]``, fp32), from which ``dW_aug = sum_i A_i dO_i + B_i q_i`` is reduced in
fixed-size row chunks, then summed over chunks in a fixed order (deterministic).

Launches: "flat" 2 (3 fused: the dW chunk programs ride in the source launch, the chunk sum is
one more kernel); "classes" one per degree class and pass, plus the chunk kernel fused.
"""

from __future__ import annotations

import math

import torch

from squall.kernels.gt_attention import tuning
from squall.kernels.gt_attention.forward import LOG2E
from squall.kernels.gt_attention.tuning import DW_ROWS_PER_CHUNK, new, new_like

try:
    import triton
    import triton.language as tl

    from squall.kernels.gt_attention import tiles

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

if HAS_TRITON:
    # ------------------------------------------------------------------------------------------
    # Steps shared by both designs
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def bwd_dst_step(
        eid64, mask_e, k, v, a, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc,
        p_ptr, pdp_ptr, offs_h, mask_h, qk_scale, H: tl.constexpr, FUSED: tl.constexpr,
    ):  # fmt: skip
        """One block of a destination's gathered edges: store ``p``, ``p dp``; add to the
        ``delta``, ``dq`` (``x_acc``, ``y_acc``) and, fused, ``A`` / ``C`` sums (``sa``, ``sc``).

        ``a`` is the edge term as gathered (features with ``qw = W_aug q``, ``gw = W_aug dO``
        when fused, else ``e`` rows). Returns the sums and this block's ``p``, ``p dp``."""
        if FUSED:
            s = tl.sum(q[None] * k, 2) + tl.sum(a[:, :, None] * qw[None], 1)
            dp = tl.sum(do[None] * v, 2) + tl.sum(a[:, :, None] * gw[None], 1)
        else:
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
    def store_dattr(
        dattr_ptr, base, p, pdp, delta, gw, qw, eid64, mask_e, offs_d, sm_scale,
        D_E: tl.constexpr,
    ):  # fmt: skip
        """``d attr_j = sum_h p G + scale (p dp - p delta) Qw`` over this program's heads, at row
        ``base + j`` of ``dattr`` (``base``: the head block's slice, 0 with all heads)."""
        ds_s = (pdp - p * delta[None, :]) * sm_scale
        da = tl.sum(p[:, None, :] * gw[None] + ds_s[:, None, :] * qw[None], 2)
        mask = mask_e[:, None] & (offs_d[None, :] < D_E)
        ptr = dattr_ptr + (base + eid64)[:, None] * D_E + offs_d[None, :]
        tl.store(ptr, da.to(dattr_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_dst_finish(
        node, beg, end, x_acc, y_acc, delta, sa, sc, p, pdp, qw, gw, w3, w_ptr, dq_ptr, dattr_ptr,
        dattr_base, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr, offs_h, hmask, offs_d, hc,
        mask_hc, row_mask, sm_scale, H: tl.constexpr, HC: tl.constexpr, FUSED: tl.constexpr,
        D_E: tl.constexpr, BLOCK_E: tl.constexpr, W_IN_REGS: tl.constexpr,
        ONE_BLOCK: tl.constexpr, DQ_E: tl.constexpr = True,
    ):  # fmt: skip
        """A destination's ``dq`` and ``delta`` and, fused, ``A``, ``B`` and ``d edge_attr``.

        ``W_IN_REGS``: ``w3`` holds this program's ``W_aug`` tile (else its rows are read one at a
        time); ``ONE_BLOCK``: the node's edges are known to fit one block, whose ``p``, ``p dp``
        are still in registers (otherwise checked at run time, and read back when they do not);
        ``DQ_E``: add the edge part ``B W_aug`` of ``dq`` here (else the caller adds it)."""
        # dq = scale * sum_j p (dp - delta) kk = scale * (x_acc - delta * y_acc)
        dq = (x_acc - delta[:, None] * y_acc) * sm_scale
        tl.store(delta_ptr + node * H + offs_h, delta, mask=hmask)
        if FUSED:
            # B = scale * sum_j ds_j a_j with ds = p dp - p delta; the e-part of dq is B W_aug.
            sb = (sc - delta[None, :] * sa) * sm_scale
            if DQ_E:
                if W_IN_REGS:
                    dq += tl.sum(sb[:, :, None] * w3, 0)
                else:
                    dq = tiles.w_expand(dq, sb, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1)
            dh = node * (D_E + 1) * H + offs_d[:, None] * H + offs_h[None, :]
            mask_dh = (offs_d[:, None] < D_E + 1) & hmask[None, :]
            tl.store(sa_ptr + dh, sa, mask=mask_dh)
            tl.store(sb_ptr + dh, sb, mask=mask_dh)
            offs_e = tl.arange(0, BLOCK_E)
            if ONE_BLOCK:
                eid = beg + offs_e
                store_dattr(
                    dattr_ptr, dattr_base, p, pdp, delta, gw, qw, eid.to(tl.int64), eid < end,
                    offs_d, sm_scale, D_E,
                )  # fmt: skip
            elif end - beg <= BLOCK_E:  # one block: its p, p dp are still in registers
                eid = beg + offs_e
                store_dattr(
                    dattr_ptr, dattr_base, p, pdp, delta, gw, qw, eid.to(tl.int64), eid < end,
                    offs_d, sm_scale, D_E,
                )  # fmt: skip
            else:
                # second pass now that delta is known, over the p, p dp rows this program wrote
                # (barrier: other threads of the program wrote them)
                tl.debug_barrier()
                mask_h = hmask
                for start in range(beg, end, BLOCK_E):
                    eid = start + offs_e
                    mask_e = eid < end
                    eid64 = eid.to(tl.int64)
                    ph = eid64[:, None] * H + offs_h[None, :]
                    mask_eh = mask_e[:, None] & mask_h[None, :]
                    p = tl.load(p_ptr + ph, mask=mask_eh, other=0.0)
                    pdp = tl.load(pdp_ptr + ph, mask=mask_eh, other=0.0)
                    store_dattr(
                        dattr_ptr, dattr_base, p, pdp, delta, gw, qw, eid64, mask_e, offs_d,
                        sm_scale, D_E,
                    )  # fmt: skip
        tl.store(dq_ptr + node * HC + hc, dq.to(dq_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def bwd_src_step(
        eid, dst, mask_e, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr, hc, mask_hc,
        offs_h, mask_h, sm_scale, SQ, H: tl.constexpr, HC: tl.constexpr, WRITE_DE: tl.constexpr,
    ):  # fmt: skip
        """One block of a source's out-edges (``eid``, ``dst`` int64): add to ``dk``, ``dv``; store
        ``de`` of each edge when ``WRITE_DE`` (materialised)."""
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
            de_at = de_ptr + eid[:, None, None] * HC + hc[None]
            tl.store(de_at, de.to(de_ptr.dtype.element_ty), mask=m3)
        return dk, dv

    @triton.jit
    def dw_chunk(
        chunk, h, sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr, N, H, C, ROWS, SQ,
        D_AUG: tl.constexpr, D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """``part[chunk, d, h, :] = sum_{i in chunk} sa[i, d, h] dO[i, h, :] + sb[i, d, h] q[i, h, :]``:
        one ``(row chunk, head)`` slice of the dW partial sums (fixed order: deterministic).
        ``IEEE``: fp32 products (fp32 inputs); else tf32 tensor cores (see
        :func:`tiles.block_dot`), which also need fewer registers: these programs share the
        source pass's kernel, whose register count sets its occupancy."""
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
            acc += tiles.block_dot(tl.trans(sa), do, IEEE)
            acc += tiles.block_dot(tl.trans(sb), q, IEEE)
        out = part_ptr + chunk * (D_AUG * HC) + offs_d[:, None] * HC + h * C + offs_c[None, :]
        tl.store(out, acc, mask=mask_d[:, None] & mask_c[None, :])

    @triton.jit
    def _dw_chunk_kernel(
        sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr, N, H, C, ROWS, SQ,
        D_AUG: tl.constexpr, D_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """Grid ``(chunks, H)`` of :func:`dw_chunk` ("classes" design)."""
        dw_chunk(
            tl.program_id(0), tl.program_id(1), sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr,
            N, H, C, ROWS, SQ, D_AUG, D_PAD, C_PAD, BLOCK_N, IEEE,
        )  # fmt: skip

    @triton.jit(do_not_specialize=["n_chunks", "n_cols", "n_first"])
    def _sum_chunks_kernel(
        part_ptr, out_ptr, out2_ptr, n_chunks, n_cols, n_first, BLOCK: tl.constexpr
    ):
        """``sum_c part[c, j]`` over chunks in ascending order, stored in the outputs' dtype:
        columns ``j < n_first`` to ``out[j]``, the rest to ``out2[j - n_first]`` (dW, db)."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(n_chunks):
            acc += tl.load(part_ptr + c * n_cols + cols, mask=mask, other=0.0)
        first = cols < n_first
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask & first)
        tl.store(out2_ptr + (cols - n_first), acc.to(out2_ptr.dtype.element_ty),
                 mask=mask & (cols >= n_first))  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # "flat": one program per node (all heads), highest degrees first
    # ------------------------------------------------------------------------------------------
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
        node, beg, end = tiles.flat_node(sched_ptr, n_sched)
        offs_h, mask_h, hc, mask_hc = tiles.all_heads(H, C, H_PAD, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + node * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + node * H + offs_h, mask=mask_h, other=0.0)
        sa = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        sc = tl.zeros([D_PAD, H_PAD], dtype=tl.float32)
        if FUSED:
            qw, gw = tiles.w_proj(
                q, do, w_ptr, hc, mask_hc, offs_d, HC, D_E + 1, True, D_PAD, H_PAD
            )
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
            eid64, k, v, a = tiles.gather(
                eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E,
            )  # fmt: skip
            x_acc, y_acc, delta, sa, sc, p, pdp = bwd_dst_step(
                eid64, mask_e, k, v, a, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc, p_ptr,
                pdp_ptr, offs_h, mask_h, qk_scale, H, FUSED,
            )  # fmt: skip
        # sa stands in for the W_aug tile, which only W_IN_REGS programs hold
        bwd_dst_finish(
            node, beg, end, x_acc, y_acc, delta, sa, sc, p, pdp, qw, gw, sa, w_ptr, dq_ptr,
            dattr_ptr, 0, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr, offs_h, mask_h, offs_d, hc,
            mask_hc, mask_hc, sm_scale, H, HC, FUSED, D_E, BLOCK_E, False, False,
        )  # fmt: skip

    @triton.jit(do_not_specialize=["n_sched", "deg_key", "n_dst"])
    def _flat_bwd_src_kernel(
        q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, dk_ptr, dv_ptr, de_ptr,
        csr_perm_ptr, csr_dst_ptr, sched_ptr, n_sched, deg_key, sm_scale, SQ,
        sa_ptr, sb_ptr, part_ptr, n_dst, rows_per_chunk,
        H: tl.constexpr, C: tl.constexpr, WRITE_DE: tl.constexpr, H_PAD: tl.constexpr,
        C_PAD: tl.constexpr, BLOCK_E: tl.constexpr, D_AUG: tl.constexpr, D_PAD_DW: tl.constexpr,
        C_PAD_DW: tl.constexpr, DW: tl.constexpr, IEEE: tl.constexpr = True,
    ):  # fmt: skip
        """Programs ``< n_sched``: per source (CSR view), all heads, ``dk``, ``dv`` and,
        materialised, ``de`` of each out-edge. Programs past them (fused launches only): the
        ``(row chunk, head)`` slices of the dW partial sums, which need only backward's first pass."""
        pid = tl.program_id(0)
        if pid < n_sched:
            HC = H * C
            node, beg, end = tiles.flat_node(sched_ptr, n_sched)
            offs_h, mask_h, hc, mask_hc = tiles.all_heads(H, C, H_PAD, C_PAD)
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
                dk, dv = bwd_src_step(
                    eid, dst, mask_e, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr,
                    hc, mask_hc, offs_h, mask_h, sm_scale, SQ, H, HC, WRITE_DE,
                )  # fmt: skip
            tl.store(dk_ptr + node * HC + hc, dk.to(dk_ptr.dtype.element_ty), mask=mask_hc)
            tl.store(dv_ptr + node * HC + hc, dv.to(dv_ptr.dtype.element_ty), mask=mask_hc)
        elif DW:  # compiled into fused launches only (sa, sb are fp32 there)
            # 16-row tf32 products: 70 registers per thread in this kernel at 4 warps (sm_90
            # ptxas, H 16, C 64) against 168 with 32-row fp32 ones, which ncu measured capping
            # the whole source pass at 3 programs per SM (o96 decoder: 509 us against 217 us
            # for the materialised source pass, which also writes de)
            idx = pid - n_sched
            dw_chunk(
                idx // H, idx % H, sa_ptr, sb_ptr, q_ptr, do_ptr, part_ptr, n_dst, H, C,
                rows_per_chunk, SQ, D_AUG, D_PAD_DW, C_PAD_DW, 16, IEEE,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # "flat", fused: blocks of destinations, W_aug products as tensor-core products per block
    # ------------------------------------------------------------------------------------------
    @triton.jit(do_not_specialize=["n_sched", "deg_key"])
    def _block_fused_bwd_dst_kernel(
        q_ptr, k_ptr, v_ptr, attr_ptr, w_ptr, b_ptr, do_ptr, lse_ptr,
        dq_ptr, dattr_ptr, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr, qw_ptr, gw_ptr,
        row_ptr, sched_ptr, n_sched, deg_key, sm_scale, qk_scale, SQ, SKV,
        H: tl.constexpr, C: tl.constexpr, D_E: tl.constexpr, D_DOT: tl.constexpr,
        H_PAD: tl.constexpr, C_PAD: tl.constexpr, C_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Destination pass of the fused backward for ``BLOCK_N`` destinations per program (as
        the forward's :func:`_block_fused_fwd_kernel`): ``W_aug q``, ``W_aug dO`` before and the
        edge part ``B W_aug`` of ``dq`` after the per-destination pass as one product per head;
        per destination as :func:`_flat_bwd_dst_kernel` (``p``, ``p dp``, ``delta``, ``A``,
        ``B``, ``d edge_attr``). ``qw``, ``gw``: ``[N, D_DOT, H]`` fp32 scratch."""
        HC = H * C
        first, nodes, valid = tiles.block_nodes(sched_ptr, n_sched, BLOCK_N)
        offs_dd = tl.arange(0, D_DOT)
        offs_cd = tl.arange(0, C_DOT)
        for h in range(H):
            tiles.block_project(
                q_ptr, SQ, nodes, valid, w_ptr, b_ptr, qw_ptr, h, offs_dd, offs_cd, H, C, D_E,
                D_DOT, IEEE,
            )  # fmt: skip
            tiles.block_project(
                do_ptr, HC, nodes, valid, w_ptr, b_ptr, gw_ptr, h, offs_dd, offs_cd, H, C, D_E,
                D_DOT, IEEE,
            )  # fmt: skip
        tl.debug_barrier()  # qw, gw rows were stored by other threads of this program
        offs_h, mask_h, hc, mask_hc = tiles.all_heads(H, C, H_PAD, C_PAD)
        offs_e = tl.arange(0, BLOCK_E)
        dh = offs_dd[:, None] * H + offs_h[None, :]
        for t in range(BLOCK_N):
            if first + t < n_sched:
                node, beg, end = tiles.block_slot(sched_ptr, n_sched, first + t)
                q = tl.load(q_ptr + node * SQ + hc, mask=mask_hc, other=0.0).to(tl.float32)
                do = tl.load(do_ptr + node * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + node * H + offs_h, mask=mask_h, other=0.0)
                qw = tl.load(qw_ptr + node * (D_DOT * H) + dh, mask=mask_h[None, :], other=0.0)
                gw = tl.load(gw_ptr + node * (D_DOT * H) + dh, mask=mask_h[None, :], other=0.0)
                sa = tl.zeros([D_DOT, H_PAD], dtype=tl.float32)
                sc = tl.zeros([D_DOT, H_PAD], dtype=tl.float32)
                x_acc = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
                y_acc = tl.zeros([H_PAD, C_PAD], dtype=tl.float32)
                delta = tl.zeros([H_PAD], dtype=tl.float32)
                p = tl.zeros([BLOCK_E, H_PAD], dtype=tl.float32)  # last block's, for d attr
                pdp = tl.zeros([BLOCK_E, H_PAD], dtype=tl.float32)
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
                    x_acc, y_acc, delta, sa, sc, p, pdp = bwd_dst_step(
                        eid64, mask_e, k, v, a, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc,
                        p_ptr, pdp_ptr, offs_h, mask_h, qk_scale, H, True,
                    )  # fmt: skip
                bwd_dst_finish(
                    node, beg, end, x_acc, y_acc, delta, sa, sc, p, pdp, qw, gw, sa, w_ptr,
                    dq_ptr, dattr_ptr, 0, sa_ptr, sb_ptr, p_ptr, pdp_ptr, delta_ptr, offs_h,
                    mask_h, offs_dd, hc, mask_hc, mask_hc, sm_scale, H, HC, True, D_E, BLOCK_E,
                    False, False, False,
                )  # fmt: skip
        tl.debug_barrier()  # dq and B rows were stored by other threads of this program
        for h in range(H):
            tiles.block_expand(
                sb_ptr, D_E + 1, nodes, valid, w_ptr, b_ptr, dq_ptr, HC, h, offs_dd, offs_cd, H, C,
                D_E, IEEE,
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # "classes": one launch per degree class and pass, DPP nodes x BLOCK_H heads per program
    # ------------------------------------------------------------------------------------------
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
        node, beg, end, hmask, row_mask = tiles.node_slot(
            slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C
        )
        q = tl.load(q_ptr + node * SQ + hc, mask=row_mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + node * HC + hc, mask=row_mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + node * H + offs_h, mask=hmask, other=0.0)
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
        if SINGLE:  # the class guarantees degree <= BLOCK_E
            eid64, mask_e, k, v, a = tiles.edge_tile(
                beg, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV, HC,
                FUSED, D_E, BLOCK_E,
            )  # fmt: skip
            x_acc, y_acc, delta, sa, sc, p, pdp = bwd_dst_step(
                eid64, mask_e, k, v, a, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc, p_ptr,
                pdp_ptr, offs_h, mask_h, qk_scale, H, FUSED,
            )  # fmt: skip
        else:
            p = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)  # last block's, for d edge_attr
            pdp = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
            for start in range(beg, end, BLOCK_E):
                eid64, mask_e, k, v, a = tiles.edge_tile(
                    start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV,
                    HC, FUSED, D_E, BLOCK_E,
                )  # fmt: skip
                x_acc, y_acc, delta, sa, sc, p, pdp = bwd_dst_step(
                    eid64, mask_e, k, v, a, q, do, lse, qw, gw, x_acc, y_acc, delta, sa, sc,
                    p_ptr, pdp_ptr, offs_h, mask_h, qk_scale, H, FUSED,
                )  # fmt: skip
        # w3 stands in for the W_aug pointer, which W_IN_REGS never reads
        bwd_dst_finish(
            node, beg, end, x_acc, y_acc, delta, sa, sc, p, pdp, qw, gw, w3, w3,
            dq_ptr, dattr_ptr, tl.program_id(1).to(tl.int64) * n_edges, sa_ptr, sb_ptr, p_ptr,
            pdp_ptr, delta_ptr, offs_h, hmask, offs_d, hc, mask_hc, row_mask, sm_scale, H, HC,
            FUSED, D_E, BLOCK_E, True, SINGLE,
        )  # fmt: skip

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
        offs_h, offs_c, mask_h, hc, mask_hc = tiles.head_tile(H, C, BLOCK_H, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        w3 = tiles.w_tile(w_ptr, hc, mask_hc, offs_d, H, C, FUSED, D_E)
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
    def _bwd_src_node(
        slot, order_end, sched_ptr, n_sched, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, dk_ptr,
        dv_ptr, de_ptr, csr_perm_ptr, csr_dst_ptr, offs_h, offs_c, mask_h, hc, mask_hc, sm_scale,
        SQ, H: tl.constexpr, C: tl.constexpr, WRITE_DE: tl.constexpr, C_PAD: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, SINGLE: tl.constexpr,
    ):  # fmt: skip
        HC = H * C
        node, beg, end, hmask, row_mask = tiles.node_slot(
            slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C
        )
        dk = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_H, C_PAD], dtype=tl.float32)
        offs_e = tl.arange(0, BLOCK_E)
        if SINGLE:
            pos = beg + offs_e
            mask_e = pos < end
            eid = tl.load(csr_perm_ptr + pos, mask=mask_e, other=0).to(tl.int64)
            dst = tl.load(csr_dst_ptr + pos, mask=mask_e, other=0).to(tl.int64)
            dk, dv = bwd_src_step(
                eid, dst, mask_e, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr, hc,
                mask_hc, offs_h, mask_h, sm_scale, SQ, H, HC, WRITE_DE,
            )  # fmt: skip
        else:
            for start in range(beg, end, BLOCK_E):
                pos = start + offs_e
                mask_e = pos < end
                eid = tl.load(csr_perm_ptr + pos, mask=mask_e, other=0).to(tl.int64)
                dst = tl.load(csr_dst_ptr + pos, mask=mask_e, other=0).to(tl.int64)
                dk, dv = bwd_src_step(
                    eid, dst, mask_e, dk, dv, q_ptr, do_ptr, p_ptr, pdp_ptr, delta_ptr, de_ptr,
                    hc, mask_hc, offs_h, mask_h, sm_scale, SQ, H, HC, WRITE_DE,
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
        offs_h, offs_c, mask_h, hc, mask_hc = tiles.head_tile(H, C, BLOCK_H, C_PAD)
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


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def launch_bwd(q, k, v, edge, attr, wb, lse, dout, kidx_tensors, dst_counts, src_counts):
    """``(dq, dk, dv, de)`` materialised, ``(dq, dk, dv, d_attr, dW, db)`` fused (``edge`` None,
    ``wb = (W, b)``).

    ``kidx_tensors``: ``(row, csr_perm, csr_dst, dst_sched, src_sched)`` of the graph's kernel
    index; ``dst_counts`` / ``src_counts`` the degree-class sizes of the two schedules."""
    with tuning.on_device(q):
        if tuning.kernel_design() == "flat":
            return _launch_flat(q, k, v, edge, attr, wb, lse, dout, kidx_tensors)
        w_aug = torch.cat([wb[0], wb[1].unsqueeze(0)], 0) if attr is not None else None
        grads = _launch_classes(
            q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors, dst_counts, src_counts
        )
        if attr is None:
            return grads
        dw_aug = grads[-1]
        return (*grads[:-1], dw_aug[:-1].clone(), dw_aug[-1].clone())


def _buffers(q, edge, attr, n_edges, dattr_rows: int):
    """``dq``, ``p``, ``p dp``, ``delta`` and the edge-term gradients' buffers of one backward."""
    n_dst, h, _ = q.shape
    dev, f32 = q.device, torch.float32
    dq = new(q.shape, q.dtype, dev)
    p = new((n_edges, h), f32, dev)
    pdp = new((n_edges, h), f32, dev)
    delta = new((n_dst, h), f32, dev)
    if attr is not None:
        d_e = attr.shape[1]
        de = new(0, f32, dev)
        if dattr_rows:
            # d edge_attr per head block, summed in a fixed order; zeroed because the head
            # blocks a class uses depend on the config its autotuner picks (unused slices stay 0).
            dattr = torch.zeros((dattr_rows, n_edges, d_e), dtype=f32, device=dev)
        else:
            dattr = new(attr.shape, attr.dtype, dev)
        sa = new((n_dst, d_e + 1, h), f32, dev)
        sb = new_like(sa)
    else:
        de = new_like(edge)
        dattr = sa = sb = de
    return dq, p, pdp, delta, de, dattr, sa, sb


def _launch_flat(q, k, v, edge, attr, wb, lse, dout, kidx_tensors):
    row, csr_perm, csr_dst, dst_sched, src_sched = kidx_tensors
    n_dst, h, c = q.shape
    n_src = k.shape[0]
    n_edges = row.shape[0]
    h_pad, c_pad = tuning.pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    d_pad = triton.next_power_of_2(d_e + 1)
    dq, p, pdp, delta, de, dattr, sa, sb = _buffers(q, edge, attr, n_edges, 0)
    sm_scale = 1.0 / math.sqrt(c)
    if n_dst and fused and tuning.FUSED_BLOCKS:
        d_dot = tuning.dot_pad(d_e + 1)
        qw = torch.empty((n_dst, d_dot, h), dtype=torch.float32, device=q.device)
        gw = torch.empty_like(qw)
        tuning.block_tuned(_block_fused_bwd_dst_kernel, "bwd_dst", h_pad, c_pad)[
            tuning.block_grid(n_dst)
        ](
            q, k, v, attr, *wb, dout, lse, dq, dattr, sa, sb, p, pdp, delta, qw, gw,
            row, dst_sched, n_dst, tuning.deg_key(n_edges, n_dst), sm_scale, sm_scale * LOG2E,
            q.stride(0), k.stride(0), H=h, C=c, D_E=d_e, D_DOT=d_dot, H_PAD=h_pad, C_PAD=c_pad,
            C_DOT=tuning.dot_pad(c), IEEE=q.dtype == torch.float32,
        )  # fmt: skip
    elif n_dst:
        w_aug = torch.cat([wb[0], wb[1].unsqueeze(0)], 0) if fused else q
        tuning.flat_tuned(_flat_bwd_dst_kernel, "bwd_dst", h_pad, c_pad, fused)[(n_dst,)](
            q, k, v, edge if edge is not None else q, attr if fused else q, w_aug, dout, lse,
            dq, dattr, sa, sb, p, pdp, delta, row, dst_sched, n_dst,
            tuning.deg_key(n_edges, n_dst), sm_scale, sm_scale * LOG2E, q.stride(0), k.stride(0),
            H=h, C=c, FUSED=fused, D_E=d_e, D_PAD=d_pad, H_PAD=h_pad, C_PAD=c_pad,
        )  # fmt: skip
    dk = new(k.shape, k.dtype, q.device)
    dv = new(v.shape, v.dtype, q.device)
    n_chunks = triton.cdiv(n_dst, DW_ROWS_PER_CHUNK) if fused else 0
    part = new((n_chunks, d_e + 1, h * c), torch.float32, q.device) if fused else de
    if n_src + n_chunks * h:
        tuning.flat_tuned(_flat_bwd_src_kernel, "bwd_src", h_pad, c_pad, fused)[
            (n_src + n_chunks * h,)
        ](
            q, dout, p, pdp, delta, dk, dv, de, csr_perm, csr_dst, src_sched, n_src,
            tuning.deg_key(n_edges, n_src), sm_scale, q.stride(0), sa, sb, part, n_dst,
            DW_ROWS_PER_CHUNK, H=h, C=c, WRITE_DE=not fused, H_PAD=h_pad, C_PAD=c_pad,
            D_AUG=d_e + 1, D_PAD_DW=max(16, d_pad), C_PAD_DW=max(16, c_pad), DW=fused,
            IEEE=q.dtype == torch.float32,
        )  # fmt: skip
    if not fused:
        return dq, dk, dv, de
    weight, bias = wb
    dw = new(weight.shape, weight.dtype, q.device)
    db = new(bias.shape, bias.dtype, q.device)
    n_cols = (d_e + 1) * h * c
    _sum_chunks_kernel[(triton.cdiv(n_cols, 1024),)](
        part, dw, db, n_chunks, n_cols, dw.numel(), BLOCK=1024
    )
    return dq, dk, dv, dattr, dw, db


def _launch_classes(q, k, v, edge, attr, w_aug, lse, dout, kidx_tensors, dst_counts, src_counts):
    row, csr_perm, csr_dst, dst_sched, src_sched = kidx_tensors
    n_dst, h, c = q.shape
    n_src = k.shape[0]
    n_edges = row.shape[0]
    h_pad, c_pad = tuning.pads(h, c)
    fused = attr is not None
    d_e = attr.shape[1] if fused else 0
    d_pad = triton.next_power_of_2(d_e + 1)
    slices = tuning.head_blocks_max(h, h_pad, c_pad) if fused else 0
    dq, p, pdp, delta, de, dattr, sa, sb = _buffers(q, edge, attr, n_edges, slices)
    sm_scale = 1.0 / math.sqrt(c)
    for cls, first, last in tuning.class_launches(dst_counts):
        tuning.class_tuned(_bwd_dst_kernel, "bwd_dst", cls, h_pad, c_pad, fused)[
            tuning.class_grid(last - first, h)
        ](
            q, k, v, edge if edge is not None else q, attr if fused else q,
            w_aug if fused else q, dout, lse,
            dq, dattr, sa, sb, p, pdp, delta,
            row, dst_sched, n_dst, first, last, n_edges,
            sm_scale, sm_scale * LOG2E, q.stride(0), k.stride(0), H=h, C=c,
            FUSED=fused, D_E=d_e, D_PAD=d_pad, C_PAD=c_pad,
        )  # fmt: skip
    dk = new(k.shape, k.dtype, q.device)
    dv = new(v.shape, v.dtype, q.device)
    for cls, first, last in tuning.class_launches(src_counts):
        tuning.class_tuned(_bwd_src_kernel, "bwd_src", cls, h_pad, c_pad, fused)[
            tuning.class_grid(last - first, h)
        ](
            q, dout, p, pdp, delta, dk, dv, de, csr_perm, csr_dst, src_sched, n_src, first, last,
            sm_scale, q.stride(0), H=h, C=c, WRITE_DE=not fused, C_PAD=c_pad,
        )  # fmt: skip
    if not fused:
        return dq, dk, dv, de
    n_chunks = max(1, triton.cdiv(n_dst, DW_ROWS_PER_CHUNK))
    part = new((n_chunks, d_e + 1, h * c), dtype=torch.float32, device=q.device)
    _dw_chunk_kernel[(n_chunks, h)](
        sa, sb, q, dout, part, n_dst, h, c, DW_ROWS_PER_CHUNK, q.stride(0),
        D_AUG=d_e + 1, D_PAD=max(16, d_pad), C_PAD=max(16, c_pad), BLOCK_N=32,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    dw_aug = part.sum(0).to(w_aug.dtype)
    return dq, dk, dv, dattr.sum(0).to(attr.dtype), dw_aug
