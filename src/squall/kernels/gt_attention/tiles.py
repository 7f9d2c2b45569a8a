"""Tile offsets, row gathers and ``W_aug`` products shared by the forward and backward kernels.

A program's rows are ``[BLOCK_H, C_PAD]`` (heads x channels, masked past ``H`` and ``C``); an edge
block is ``BLOCK_E`` consecutive edges of one node's CSC (or CSR) range. ``W_aug = [W; b]`` is
``[d_e + 1, H*C]``; an edge's features carry a trailing 1 so that the bias is its last row.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def load_w(w_ptr, hc, mask_hc, offs_d, HC, D_AUG: tl.constexpr):
        """``W_aug`` rows for this program's heads, ``[D_PAD, BLOCK_H, C_PAD]`` fp32 (0 past D_AUG)."""
        mask = (offs_d[:, None, None] < D_AUG) & mask_hc[None, :, :]
        w = tl.load(w_ptr + offs_d[:, None, None] * HC + hc[None, :, :], mask=mask, other=0.0)
        return w.to(tl.float32)

    @triton.jit
    def load_attr(attr_ptr, eid, mask_e, offs_d, D_E: tl.constexpr):
        """Edge features ``[BLOCK_E, D_PAD]`` with a trailing column of ones (the bias row)."""
        a = tl.load(
            attr_ptr + eid[:, None] * D_E + offs_d[None, :],
            mask=mask_e[:, None] & (offs_d[None, :] < D_E),
            other=0.0,
        ).to(tl.float32)
        return tl.where((offs_d[None, :] == D_E) & mask_e[:, None], 1.0, a)

    @triton.jit
    def head_tile(H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr, C_PAD: tl.constexpr):
        """This program's head block (grid axis 1): ``offs_h``, ``offs_c``, ``mask_h`` and the
        ``[BLOCK_H, C_PAD]`` row offsets ``hc`` with their mask."""
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, C_PAD)
        mask_h = offs_h < H
        hc = offs_h[:, None] * C + offs_c[None, :]
        mask_hc = mask_h[:, None] & (offs_c[None, :] < C)
        return offs_h, offs_c, mask_h, hc, mask_hc

    @triton.jit
    def all_heads(H: tl.constexpr, C: tl.constexpr, H_PAD: tl.constexpr, C_PAD: tl.constexpr):
        """Offsets and masks of a whole ``[H_PAD, C_PAD]`` row (every head of a node)."""
        offs_h = tl.arange(0, H_PAD)
        offs_c = tl.arange(0, C_PAD)
        mask_h = offs_h < H
        hc = offs_h[:, None] * C + offs_c[None, :]
        mask_hc = mask_h[:, None] & (offs_c[None, :] < C)
        return offs_h, mask_h, hc, mask_hc

    @triton.jit
    def w_tile(w_ptr, hc, mask_hc, offs_d, H: tl.constexpr, C: tl.constexpr,
               FUSED: tl.constexpr, D_E: tl.constexpr):  # fmt: skip
        """``W_aug`` tile of a fused program, loaded once per program (a dummy otherwise)."""
        if FUSED:
            w3 = load_w(w_ptr, hc, mask_hc, offs_d, H * C, D_E + 1)
        else:
            w3 = tl.zeros([1, 1, 1], dtype=tl.float32)
        return w3

    @triton.jit
    def w_proj(
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
    def w_expand(acc, coef, w_ptr, hc, mask_hc, offs_d, HC, D_AUG: tl.constexpr):
        """``acc + sum_d coef[d, h] W_aug[d, h, :]``, one W row at a time."""
        for d in tl.static_range(D_AUG):
            w = tl.load(w_ptr + d * HC + hc, mask=mask_hc, other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(offs_d[:, None] == d, coef, 0.0), 0)[:, None] * w
        return acc

    # ------------------------------------------------------------------------------------------
    # Blocks of destinations (fused mode): the per-node W_aug products as tensor-core products
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def w_aug_head(w_ptr, b_ptr, h, offs_d, offs_c, C: tl.constexpr, HC, D_E: tl.constexpr):
        """``W_aug[:, h, :]`` as ``[D_DOT, C_DOT]`` fp32: W's rows, the bias as row ``D_E``, zero
        past it and past ``C``."""
        col = h * C + offs_c
        mask_c = offs_c < C
        w = tl.load(
            w_ptr + offs_d[:, None] * HC + col[None, :],
            mask=(offs_d[:, None] < D_E) & mask_c[None, :],
            other=0.0,
        ).to(tl.float32)
        b = tl.load(b_ptr + col, mask=mask_c, other=0.0).to(tl.float32)
        return tl.where(offs_d[:, None] == D_E, b[None, :], w)

    @triton.jit
    def block_nodes(sched_ptr, n_sched, BLOCK_N: tl.constexpr):
        """This program's ``BLOCK_N`` schedule slots, taken from the end of the degree-class
        schedule (highest degrees first): first slot index, node ids (int64) and their mask."""
        first = tl.program_id(0) * BLOCK_N
        idx = first + tl.arange(0, BLOCK_N)
        valid = idx < n_sched
        nodes = tl.load(sched_ptr + (n_sched - 1 - idx), mask=valid, other=0).to(tl.int64)
        return first, nodes, valid

    @triton.jit
    def block_slot(sched_ptr, n_sched, slot_idx):
        """Node id and edge range of schedule slot ``slot_idx`` counted from the end."""
        slot = n_sched - 1 - slot_idx
        node = tl.load(sched_ptr + slot).to(tl.int64)
        beg = tl.load(sched_ptr + n_sched + slot)
        end = tl.load(sched_ptr + 2 * n_sched + slot)
        return node, beg, end

    @triton.jit
    def block_dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` in fp32: exact IEEE products for fp32 inputs, tf32 tensor cores otherwise
        (bf16 and fp16 values are exact in tf32; W's fp32 values round to 2^-11, below the 2^-8 /
        2^-11 rounding of the 16-bit edge term the reference forms)."""
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b, input_precision="tf32")
        return r

    @triton.jit
    def block_project(
        x_ptr, SX, nodes, valid, w_ptr, b_ptr, xw_ptr, h, offs_d, offs_c,
        H: tl.constexpr, C: tl.constexpr, D_E: tl.constexpr, D_DOT: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """``xw[node, d, h] = sum_c x[node, h, c] W_aug[d, h, c]`` for the block's nodes and head
        ``h``: one ``[BLOCK_N, C_DOT] x [C_DOT, D_DOT]`` product (``xw`` is ``[N, D_DOT, H]``
        fp32, zero past ``D_E + 1``)."""
        mask_x = valid[:, None] & (offs_c[None, :] < C)
        x = tl.load(x_ptr + nodes[:, None] * SX + h * C + offs_c[None, :], mask=mask_x, other=0.0)
        w = w_aug_head(w_ptr, b_ptr, h, offs_d, offs_c, C, H * C, D_E)
        xw = block_dot(x.to(tl.float32), tl.trans(w), IEEE)
        ptr = xw_ptr + nodes[:, None] * (D_DOT * H) + offs_d[None, :] * H + h
        tl.store(ptr, xw, mask=valid[:, None] & (offs_d[None, :] < D_DOT))

    @triton.jit
    def block_expand(
        coef_ptr, D_ROWS: tl.constexpr, nodes, valid, w_ptr, b_ptr, y_ptr, SY, h, offs_d, offs_c,
        H: tl.constexpr, C: tl.constexpr, D_E: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """``y[node, h, :] += sum_d coef[node, d, h] W_aug[d, h, :]`` for the block's nodes and
        head ``h`` (``coef`` is ``[N, D_ROWS, H]`` fp32): one ``[BLOCK_N, D_DOT] x [D_DOT, C_DOT]``
        product added to the row the per-node pass stored in ``y``'s dtype."""
        coef = tl.load(
            coef_ptr + nodes[:, None] * (D_ROWS * H) + offs_d[None, :] * H + h,
            mask=valid[:, None] & (offs_d[None, :] < D_ROWS),
            other=0.0,
        )
        w = w_aug_head(w_ptr, b_ptr, h, offs_d, offs_c, C, H * C, D_E)
        ey = block_dot(coef, w, IEEE)
        ptr = y_ptr + nodes[:, None] * SY + h * C + offs_c[None, :]
        mask = valid[:, None] & (offs_c[None, :] < C)
        y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (y + ey).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def node_slot(slot, order_end, sched_ptr, n_sched, offs_h, offs_c, mask_h, C: tl.constexpr):
        """Node id and edge range of schedule slot ``slot`` ("classes" programs), with the row
        masks of its heads.

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
    def flat_node(sched_ptr, n_sched):
        """Node id and edge range of this "flat" program. Slots are taken from the end of the
        degree-class schedule, so the highest-degree nodes (the longest programs) start first and
        the launch ends on short ones instead of a tail of long ones."""
        slot = n_sched - 1 - tl.program_id(0)
        node = tl.load(sched_ptr + slot).to(tl.int64)
        beg = tl.load(sched_ptr + n_sched + slot)
        end = tl.load(sched_ptr + 2 * n_sched + slot)
        return node, beg, end

    @triton.jit
    def gather(
        eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV,
        HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr,
    ):  # fmt: skip
        """k, v rows of the block's sources and its edge term: features ``[BLOCK_E, D_PAD]``
        (fused) or ``e`` rows ``[BLOCK_E, BLOCK_H, C_PAD]``, all fp32; and the edge ids as int64."""
        eid64 = eid.to(tl.int64)
        m3 = mask_e[:, None, None] & mask_hc[None, :, :]
        kv = src.to(tl.int64)[:, None, None] * SKV + hc[None]
        k = tl.load(k_ptr + kv, mask=m3, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv, mask=m3, other=0.0).to(tl.float32)
        if FUSED:
            edge = load_attr(attr_ptr, eid64, mask_e, offs_d, D_E)
        else:
            edge = tl.load(e_ptr + eid64[:, None, None] * HC + hc[None], mask=m3, other=0.0)
            edge = edge.to(tl.float32)
        return eid64, k, v, edge

    @triton.jit
    def edge_tile(
        start, end, k_ptr, v_ptr, e_ptr, attr_ptr, row_ptr, hc, mask_hc, offs_d, SKV,
        HC: tl.constexpr, FUSED: tl.constexpr, D_E: tl.constexpr, BLOCK_E: tl.constexpr,
    ):  # fmt: skip
        """Edges ``start .. start + BLOCK_E`` (below ``end``): ids, mask and :func:`gather`."""
        eid = start + tl.arange(0, BLOCK_E)
        mask_e = eid < end
        src = tl.load(row_ptr + eid, mask=mask_e, other=0)
        eid64, k, v, edge = gather(
            eid, mask_e, src, k_ptr, v_ptr, e_ptr, attr_ptr, hc, mask_hc, offs_d, SKV, HC,
            FUSED, D_E,
        )  # fmt: skip
        return eid64, mask_e, k, v, edge
