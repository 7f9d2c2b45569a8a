"""Triton kernels of the exact sphere search over latitude bands (:mod:`squall.graphs.search`).

One program holds ``BLOCK`` queries, one per lane, and walks their candidate windows over the
banded sources: the bands within the search angle of the block's latitudes, and in each band
the longitude window of the query's spherical cap, read from a per-band table of longitude cells
(:func:`cell_table`) instead of binary searches. The sources (unit vectors and source index in
banded order) stay in L2; nothing of size ``[queries, candidates]`` is ever written.

* :func:`knn_rows`: the ``K`` nearest candidates of each query, kept in registers and ordered by
  ``(d2, source index)``; the caller accepts a query when its ``K``-th candidate lies inside the
  search angle and searches again with a wider angle otherwise, exactly as the torch path does.
* :func:`radius_counts`, :func:`radius_fill`, :func:`sort_runs`: every source within a chord
  radius, in two passes over the same windows (count, exclusive cumulative sum, fill), then
  each query's run ordered by source index (one lane per edge ranks it within its run).

Windows are a superset of the torch path's (whole cells rather than exact binary-search bounds):
a window only decides which sources are *examined*; which are *chosen* depends on the distances
alone, computed in the module's fixed float64 order ``((dx * dx + dy * dy) + dz * dz)`` with
floating-point contraction off, so the results equal the torch path's bit for bit. The pure
PyTorch reference of both kernels is that torch path (:func:`squall.graphs.search.knn` and
:func:`~squall.graphs.search.radius` on any device with ``SQUALL_SEARCH_KERNEL=0``), which the
tests compare against under ``TRITON_INTERPRET=1``.

Float64 constants enter the kernels through a small tensor (:func:`_constants`): a Python float
literal would be rounded to float32 by Triton.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

#: Queries per program (one per lane). 128 lanes (4 warps) keep the band loop shared by queries of
#: neighbouring latitudes while giving an H200's 132 SMs ~400 programs per million queries.
BLOCK = 128
#: Queries per warp (one per lane): a program runs ``BLOCK // 32`` warps.
WARP = 32
#: Largest ``k`` the k-nearest kernel keeps in registers (``[BLOCK, K]`` distances and indices per
#: program); larger ``k`` (never used by the graph specs, whose knn edges use k <= 16) takes the
#: torch path.
MAX_K = 32
#: Source index sentinels: above every real index (int32 sources, N < 2^31 - 2 * MAX_K).
_SENTINEL = 2**31 - 1 - 2 * MAX_K
_SENT = tl.constexpr(_SENTINEL)
_INT_MAX = tl.constexpr(2**31 - 1)

# Slots of the float64 constants tensor.
_TWO_PI, _HALF_PI, _MARGIN, _CELL_SCALE, _INV_HEIGHT, _TINY, _FULL_DENOM, _THETA, _R2 = range(9)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _constants(index, cells_per_band: int, theta: float = 0.0, r2: float = 0.0) -> torch.Tensor:
    """The kernels' float64 constants (slots ``_TWO_PI`` ...)."""
    from squall.graphs.search import HALF_PI, MARGIN, TWO_PI

    values = [0.0] * 9
    values[_TWO_PI], values[_HALF_PI], values[_MARGIN] = TWO_PI, HALF_PI, MARGIN
    values[_CELL_SCALE] = cells_per_band / TWO_PI
    values[_INV_HEIGHT] = index.band_lo.numel() / math.pi
    # the torch path's bounds: denominators below 1e-12 mean a pole inside the cap, 1e-300 the
    # clamp of a zero denominator
    values[_TINY], values[_FULL_DENOM] = 1e-300, 1e-12
    values[_THETA], values[_R2] = theta, r2
    # non_blocking: a plain host-to-device copy would wait for the whole stream
    return torch.tensor(values, dtype=torch.float64).to(index.device, non_blocking=True)


def cells_per_band(index) -> int:
    """Longitude cells per band: one source per cell on average (a window then reaches past
    its exact bounds by about one source at each end)."""
    bands = index.band_lo.numel()
    return max(1, -(-index.num // bands))


def cell_table(index, cells: int) -> torch.Tensor:
    """``[B * (cells + 1)]`` int32: entry ``b * (cells + 1) + c`` is the first banded position of
    band ``b`` whose longitude cell is ``>= c`` (entry ``c = cells`` is the band's end).

    A position's longitude is recovered exactly from its key, ``key - 8 * band`` (Sterbenz: the
    two are within a factor of two for ``band >= 1``; ``key`` is the longitude for band 0), so
    cells rise with the key along each band and every source whose longitude lies in ``[west,
    east]`` sits between the entries of ``cell(west)`` and ``cell(east) + 1``.
    """
    bands = index.band_lo.numel()
    band = torch.repeat_interleave(torch.arange(bands, device=index.device), index.band_count,
                                   output_size=index.num)  # fmt: skip
    lon = index.key - band.to(torch.float64) * 8
    # a Python float multiplies a float64 tensor as float64: the bits of the kernels' scale
    cell = torch.floor(lon * (cells / (2 * math.pi))).clamp_(0, cells - 1).to(torch.int64)
    sorted_cells = band * (cells + 1) + cell
    probes = torch.arange(bands * (cells + 1), device=index.device)
    return torch.searchsorted(sorted_cells, probes).to(torch.int32)


def _numpy(name: str, x):
    """numpy's ufunc ``name`` applied to an interpreted Triton tensor: Triton's interpreter has
    no libdevice, so the kernels' inverse sines and cosines come from numpy there."""
    from triton.runtime.interpreter import TensorHandle

    return tl.tensor(TensorHandle(getattr(np, name)(x.handle.data), x.handle.dtype), x.type)


# Triton's dependency scan (the kernels' cache key) rejects plain Python functions even in a
# branch the compiler drops (``INTERP`` false); it skips builtins.
_numpy.__triton_builtin__ = True


@triton.jit
def _asin(x, INTERP: tl.constexpr):
    if INTERP:
        return _numpy("arcsin", x)
    else:
        return libdevice.asin(x)


@triton.jit
def _acos(x, INTERP: tl.constexpr):
    if INTERP:
        return _numpy("arccos", x)
    else:
        return libdevice.acos(x)


@triton.jit
def _prepare(rows_ptr, theta_ptr, qlat_ptr, qlon_ptr, c_ptr, n_rows, n_bands, pid,
             PER_ROW_THETA: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Rows of this program, their query ids, latitudes, longitudes, search angles (+ margin)
    and the block's band range."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_rows
    q = tl.load(rows_ptr + offs, mask=mask, other=0)
    phi = tl.load(qlat_ptr + q, mask=mask, other=0.0)
    lam = tl.load(qlon_ptr + q, mask=mask, other=0.0)
    if PER_ROW_THETA:
        theta = tl.load(theta_ptr + offs, mask=mask, other=0.0)
    else:
        theta = tl.zeros([BLOCK], dtype=tl.float64) + tl.load(c_ptr + 7)
    th = theta + tl.load(c_ptr + 2)
    half_pi = tl.load(c_ptr + 1)
    inv_h = tl.load(c_ptr + 4)
    # the torch path's band range: bands are found by arithmetic here, which may differ from its
    # binary search only for a latitude within rounding (1e-15 rad) of a band edge, and such
    # an edge lies MARGIN outside the search angle proper
    b0 = tl.floor((phi - th + half_pi) * inv_h).to(tl.int32)
    b1 = tl.floor((phi + th + half_pi) * inv_h).to(tl.int32)
    b0 = tl.where(mask, tl.maximum(b0, 0), n_bands)
    b1 = tl.where(mask, tl.minimum(b1, n_bands - 1), -1)
    return offs, mask, q, phi, lam, th, b0, b1


@triton.jit
def _candidate(j, s1, n1, s2, length, sx_ptr, sy_ptr, sz_ptr, qx, qy, qz):
    """The ``j``-th source of a window (``n1`` from ``s1``, then from ``s2``): whether it exists,
    its position in the banded arrays and its squared chord to the query."""
    active = j < length
    pos = tl.where(j < n1, s1 + j, s2 + (j - n1))
    # source - query, ((dx * dx + dy * dy) + dz * dz): the torch path's order (the launch turns
    # contraction into FMAs off)
    dx = tl.load(sx_ptr + pos, mask=active, other=0.0) - qx
    dy = tl.load(sy_ptr + pos, mask=active, other=0.0) - qy
    dz = tl.load(sz_ptr + pos, mask=active, other=0.0) - qz
    return active, pos, (dx * dx + dy * dy) + dz * dz


@triton.jit
def _window(b, phi, lam, th, sin_phi, cos_phi, cos_th, p_star, in_band, band_lo_ptr, band_hi_ptr,
            cells_ptr, n_cells, two_pi, half_pi, margin, scale, tiny, full_denom,
            INTERP: tl.constexpr):  # fmt: skip
    """Banded positions ``[s1, s1 + n1)`` and ``[s2, s2 + n2)`` of band ``b`` in each query's
    window (the torch path's ``_segments``, widened to whole longitude cells)."""
    lo = tl.maximum(tl.load(band_lo_ptr + b), phi - th)
    hi = tl.minimum(tl.load(band_hi_ptr + b), phi + th)
    valid = in_band & (lo <= hi)
    # longitude half-width of the cap at its widest latitude inside the band
    p = tl.minimum(tl.maximum(p_star, lo), hi)
    denom = cos_phi * tl.cos(p)
    cos_dl = (cos_th - sin_phi * tl.sin(p)) / tl.maximum(denom, tiny)
    dl = _acos(tl.minimum(tl.maximum(cos_dl, -1.0), 1.0), INTERP) + margin
    full = (denom < full_denom) | (cos_dl <= -1.0) | (tl.abs(phi) + th >= half_pi)
    full = full | (dl >= 2.0 * half_pi)
    west = lam - dl
    west = west - tl.floor(west / two_pi) * two_pi
    east = west + 2.0 * dl
    wraps = east >= two_pi
    east = tl.where(wraps, east - two_pi, east)
    cw = tl.minimum(tl.maximum(tl.floor(west * scale), 0.0), n_cells - 1.0).to(tl.int32)
    ce = tl.minimum(tl.maximum(tl.floor(east * scale), 0.0), n_cells - 1.0).to(tl.int32)
    base = b * (n_cells + 1)
    band_start = tl.load(cells_ptr + base)
    band_end = tl.load(cells_ptr + base + n_cells)
    start_a = tl.load(cells_ptr + base + cw, mask=valid, other=0)
    end_east = tl.load(cells_ptr + base + ce + 1, mask=valid, other=0)
    end_a = tl.where(wraps, band_end, end_east)
    # the wrapped part stops where the first part starts (both may share a cell)
    end_b = tl.where(wraps, tl.minimum(end_east, start_a), band_start)
    start_a = tl.where(full, band_start, start_a)
    end_a = tl.where(full, band_end, end_a)
    end_b = tl.where(full, band_start, end_b)
    n1 = tl.where(valid, end_a - start_a, 0)
    n2 = tl.where(valid, end_b - band_start, 0)
    return start_a, n1, band_start, n2


@triton.jit
def _knn_kernel(rows_ptr, theta_ptr, qlat_ptr, qlon_ptr, qx_ptr, qy_ptr, qz_ptr, n_rows,
                band_lo_ptr, band_hi_ptr, n_bands, cells_ptr, n_cells,
                sx_ptr, sy_ptr, sz_ptr, sid_ptr, c_ptr, out_idx_ptr, out_d2_ptr, kth_ptr,
                K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                PER_ROW_THETA: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """The ``K`` nearest candidates of each query ``rows[i]``, written to row ``rows[i]`` of
    ``out_idx`` / ``out_d2``, and the ``K``-th distance to ``kth[i]``."""
    pid = tl.program_id(0)
    offs, mask, q, phi, lam, th, b0, b1 = _prepare(
        rows_ptr, theta_ptr, qlat_ptr, qlon_ptr, c_ptr, n_rows, n_bands, pid, PER_ROW_THETA, BLOCK
    )
    qx = tl.load(qx_ptr + q, mask=mask, other=0.0)
    qy = tl.load(qy_ptr + q, mask=mask, other=0.0)
    qz = tl.load(qz_ptr + q, mask=mask, other=0.0)
    sin_phi = tl.sin(phi)
    cos_phi = tl.cos(phi)
    cos_th = tl.cos(th)
    p_star = _asin(tl.minimum(tl.maximum(sin_phi / cos_th, -1.0), 1.0), INTERP)
    two_pi, half_pi, margin = tl.load(c_ptr + 0), tl.load(c_ptr + 1), tl.load(c_ptr + 2)
    scale, tiny, full_denom = tl.load(c_ptr + 3), tl.load(c_ptr + 5), tl.load(c_ptr + 6)

    inf = float("inf")
    if K <= 4:
        # Up to 4 best as sorted registers (d0, i0) <= ... <= (d3, i3): each candidate enters
        # by a compare-and-shift network, no reduction per candidate.
        d0 = tl.zeros([BLOCK], dtype=tl.float64) + inf
        d1, d2, d3 = d0, d0, d0
        i0 = tl.zeros([BLOCK], dtype=tl.int32) + _SENT
        i1, i2, i3 = i0 + 1, i0 + 2, i0 + 3
        for b in range(tl.min(b0, 0), tl.max(b1, 0) + 1):
            in_band = mask & (b >= b0) & (b <= b1)
            s1, n1, s2, n2 = _window(b, phi, lam, th, sin_phi, cos_phi, cos_th, p_star, in_band,
                                     band_lo_ptr, band_hi_ptr, cells_ptr, n_cells, two_pi,
                                     half_pi, margin, scale, tiny, full_denom, INTERP)  # fmt: skip
            length = n1 + n2
            for j in range(0, tl.max(length, 0)):
                active, pos, d = _candidate(j, s1, n1, s2, length, sx_ptr, sy_ptr, sz_ptr, qx, qy,
                                            qz)  # fmt: skip
                i = tl.load(sid_ptr + pos, mask=active, other=0)
                lt0 = active & ((d < d0) | ((d == d0) & (i < i0)))
                lt1 = active & ((d < d1) | ((d == d1) & (i < i1)))
                lt2 = active & ((d < d2) | ((d == d2) & (i < i2)))
                lt3 = active & ((d < d3) | ((d == d3) & (i < i3)))
                d3 = tl.where(lt2, d2, tl.where(lt3, d, d3))
                i3 = tl.where(lt2, i2, tl.where(lt3, i, i3))
                d2 = tl.where(lt1, d1, tl.where(lt2, d, d2))
                i2 = tl.where(lt1, i1, tl.where(lt2, i, i2))
                d1 = tl.where(lt0, d0, tl.where(lt1, d, d1))
                i1 = tl.where(lt0, i0, tl.where(lt1, i, i1))
                d0 = tl.where(lt0, d, d0)
                i0 = tl.where(lt0, i, i0)
        out = q * K
        tl.store(out_d2_ptr + out, d0, mask=mask)
        tl.store(out_idx_ptr + out, i0.to(tl.int64), mask=mask)
        if K > 1:
            tl.store(out_d2_ptr + out + 1, d1, mask=mask)
            tl.store(out_idx_ptr + out + 1, i1.to(tl.int64), mask=mask)
        if K > 2:
            tl.store(out_d2_ptr + out + 2, d2, mask=mask)
            tl.store(out_idx_ptr + out + 2, i2.to(tl.int64), mask=mask)
        if K > 3:
            tl.store(out_d2_ptr + out + 3, d3, mask=mask)
            tl.store(out_idx_ptr + out + 3, i3.to(tl.int64), mask=mask)
        if K == 1:
            tl.store(kth_ptr + offs, d0, mask=mask)
        elif K == 2:
            tl.store(kth_ptr + offs, d1, mask=mask)
        elif K == 3:
            tl.store(kth_ptr + offs, d2, mask=mask)
        else:
            tl.store(kth_ptr + offs, d3, mask=mask)
    else:
        # Best K as [BLOCK, K_PAD] (d2, index); distinct sentinels (inf, _SENT + column) so
        # the worst entry is one slot; padding columns hold (-inf, -1), never the worst.
        col = tl.arange(0, K_PAD)[None, :]
        real = col < K
        best_d = tl.where(real, inf, -inf) + tl.zeros([BLOCK, K_PAD], dtype=tl.float64)
        best_i = tl.where(real, _SENT + col, -1) + tl.zeros([BLOCK, K_PAD], tl.int32)
        worst_d = tl.zeros([BLOCK], dtype=tl.float64) + inf
        worst_i = tl.zeros([BLOCK], dtype=tl.int32) + (_SENT + K - 1)
        for b in range(tl.min(b0, 0), tl.max(b1, 0) + 1):
            in_band = mask & (b >= b0) & (b <= b1)
            s1, n1, s2, n2 = _window(b, phi, lam, th, sin_phi, cos_phi, cos_th, p_star, in_band,
                                     band_lo_ptr, band_hi_ptr, cells_ptr, n_cells, two_pi,
                                     half_pi, margin, scale, tiny, full_denom, INTERP)  # fmt: skip
            length = n1 + n2
            for j in range(0, tl.max(length, 0)):
                active, pos, d = _candidate(j, s1, n1, s2, length, sx_ptr, sy_ptr, sz_ptr, qx, qy,
                                            qz)  # fmt: skip
                i = tl.load(sid_ptr + pos, mask=active, other=0)
                better = active & ((d < worst_d) | ((d == worst_d) & (i < worst_i)))
                slot = (best_d == worst_d[:, None]) & (best_i == worst_i[:, None])
                slot = slot & better[:, None]
                best_d = tl.where(slot, d[:, None], best_d)
                best_i = tl.where(slot, i[:, None], best_i)
                worst_d = tl.max(best_d, 1)
                worst_i = tl.max(tl.where(best_d == worst_d[:, None], best_i, -1), 1)
        # the K in ascending (d2, index) order: take the smallest K times
        best_d = tl.where(real, best_d, inf)
        best_i = tl.where(real, best_i, _INT_MAX)
        for r in tl.static_range(K):
            md = tl.min(best_d, 1)
            mi = tl.min(tl.where(best_d == md[:, None], best_i, _INT_MAX), 1)
            tl.store(out_d2_ptr + q * K + r, md, mask=mask)
            tl.store(out_idx_ptr + q * K + r, mi.to(tl.int64), mask=mask)
            if r == K - 1:
                tl.store(kth_ptr + offs, md, mask=mask)
            taken = (best_d == md[:, None]) & (best_i == mi[:, None])
            best_d = tl.where(taken, inf, best_d)
            best_i = tl.where(taken, _INT_MAX, best_i)


@triton.jit
def _radius_kernel(rows_ptr, qlat_ptr, qlon_ptr, qx_ptr, qy_ptr, qz_ptr, n_rows,
                   band_lo_ptr, band_hi_ptr, n_bands, cells_ptr, n_cells,
                   sx_ptr, sy_ptr, sz_ptr, sid_ptr, c_ptr, count_ptr, offset_ptr, cap,
                   out_q_ptr, out_src_ptr, out_d2_ptr, FILL: tl.constexpr, BLOCK: tl.constexpr,
                   INTERP: tl.constexpr):  # fmt: skip
    """Count (``FILL`` false: ``count[q]``) or write (``FILL``: query, source and ``d2`` at
    ``offset[q]`` onwards, in window order, for queries with ``count[q] <= cap``) the sources
    within the radius of each query."""
    pid = tl.program_id(0)
    offs, mask, q, phi, lam, th, b0, b1 = _prepare(
        rows_ptr, rows_ptr, qlat_ptr, qlon_ptr, c_ptr, n_rows, n_bands, pid, False, BLOCK
    )
    qx = tl.load(qx_ptr + q, mask=mask, other=0.0)
    qy = tl.load(qy_ptr + q, mask=mask, other=0.0)
    qz = tl.load(qz_ptr + q, mask=mask, other=0.0)
    r2 = tl.load(c_ptr + 8)
    sin_phi = tl.sin(phi)
    cos_phi = tl.cos(phi)
    cos_th = tl.cos(th)
    p_star = _asin(tl.minimum(tl.maximum(sin_phi / cos_th, -1.0), 1.0), INTERP)
    two_pi, half_pi, margin = tl.load(c_ptr + 0), tl.load(c_ptr + 1), tl.load(c_ptr + 2)
    scale, tiny, full_denom = tl.load(c_ptr + 3), tl.load(c_ptr + 5), tl.load(c_ptr + 6)
    if FILL:
        write = mask & (tl.load(count_ptr + q, mask=mask, other=0) <= cap)
        at = tl.load(offset_ptr + q, mask=mask, other=0)
    else:
        write = mask
        at = tl.zeros([BLOCK], dtype=tl.int64)
    found = tl.zeros([BLOCK], dtype=tl.int32)
    for b in range(tl.min(b0, 0), tl.max(b1, 0) + 1):
        in_band = write & (b >= b0) & (b <= b1)
        s1, n1, s2, n2 = _window(b, phi, lam, th, sin_phi, cos_phi, cos_th, p_star, in_band,
                                 band_lo_ptr, band_hi_ptr, cells_ptr, n_cells, two_pi, half_pi,
                                 margin, scale, tiny, full_denom, INTERP)  # fmt: skip
        length = n1 + n2
        for j in range(0, tl.max(length, 0)):
            active, pos, d = _candidate(j, s1, n1, s2, length, sx_ptr, sy_ptr, sz_ptr, qx, qy, qz)
            inside = active & (d <= r2)
            if FILL:
                i = tl.load(sid_ptr + pos, mask=inside, other=0)
                tl.store(out_q_ptr + at + found, q, mask=inside)
                tl.store(out_src_ptr + at + found, i.to(tl.int64), mask=inside)
                tl.store(out_d2_ptr + at + found, d, mask=inside)
            found += inside.to(tl.int32)
    if not FILL:
        tl.store(count_ptr + q, found.to(tl.int64), mask=mask)


def _launch_options() -> dict:
    """Launch options: float contraction off on the GPU (the interpreter computes in numpy,
    which never contracts)."""
    if interpreting():
        return {"INTERP": True}
    return {"INTERP": False, "num_warps": max(1, BLOCK // WARP), "enable_fp_fusion": False}


class BandedSources:
    """The kernels' view of a :class:`~squall.graphs.search.SphereIndex` (built once per index):
    unit vectors and source index in banded order, and the longitude cell table."""

    def __init__(self, index):
        if index.key is None:
            raise ValueError("the search kernels need an index of latitude bands (not grid rows)")
        if index.num >= _SENTINEL:
            raise ValueError(f"{index.num} sources do not fit the kernels' int32 source ids")
        order = index.order
        self.index = index
        self.x, self.y, self.z = index.xyz[:, order]  # one gather, rows contiguous
        self.sid = order.to(torch.int32)
        self.cells = cells_per_band(index)
        self.table = cell_table(index, self.cells)
        self.band_lo = index.band_lo.contiguous()
        self.band_hi = index.band_hi.contiguous()

    def args(self):
        return (self.band_lo, self.band_hi, self.band_lo.numel(), self.table, self.cells,
                self.x, self.y, self.z, self.sid)  # fmt: skip


def knn_rows(src: BandedSources, rows, theta, lat, lon, qxyz, k: int, out_idx, out_d2):
    """The ``k`` nearest candidates of the queries ``rows`` within their windows of angle
    ``theta`` (a float for all, or a ``[R]`` tensor), ordered by ``(d2, index)`` and written to
    those rows of ``out_idx`` / ``out_d2`` (``[Q, k]``); returns the ``[R]`` ``k``-th distances
    (``inf`` where fewer than ``k`` candidates were found)."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k-nearest kernel: k={k} must be between 1 and {MAX_K}")
    n = rows.numel()
    kth = torch.empty(n, dtype=torch.float64, device=rows.device)
    if n == 0:
        return kth
    per_row = isinstance(theta, torch.Tensor)
    consts = _constants(src.index, src.cells, 0.0 if per_row else float(theta))
    grid = (triton.cdiv(n, BLOCK),)
    _knn_kernel[grid](rows, theta.contiguous() if per_row else consts, lat, lon, qxyz[0],
                      qxyz[1], qxyz[2], n, *src.args(), consts, out_idx, out_d2, kth, K=k,
                      K_PAD=triton.next_power_of_2(k), BLOCK=BLOCK, PER_ROW_THETA=per_row,
                      **_launch_options())  # fmt: skip
    return kth


def radius_counts(src: BandedSources, rows, theta: float, r2: float, lat, lon, qxyz, nq: int):
    """``[nq]`` int64 number of sources with ``d2 <= r2`` of each query in ``rows`` (search
    angle ``theta``); the count pass of :func:`radius_fill`."""
    counts = torch.zeros(nq, dtype=torch.int64, device=rows.device)
    consts = _constants(src.index, src.cells, theta, r2)
    if rows.numel():
        _radius_kernel[(triton.cdiv(rows.numel(), BLOCK),)](
            rows, lat, lon, qxyz[0], qxyz[1], qxyz[2], rows.numel(), *src.args(), consts,
            counts, counts, 0, counts, counts, consts, FILL=False, BLOCK=BLOCK,
            **_launch_options(),
        )  # fmt: skip
    return counts, consts


def radius_fill(src: BandedSources, rows, consts, lat, lon, qxyz, counts, offsets, cap: int,
                total: int):  # fmt: skip
    """Query, source index and ``d2`` (``[total]`` each) of each query with ``counts[q] <=
    cap``, written at ``offsets[q]`` onwards in window order (positions of other queries are
    left unwritten)."""
    out_q = torch.empty(total, dtype=torch.int64, device=rows.device)
    out_src = torch.empty(total, dtype=torch.int64, device=rows.device)
    out_d2 = torch.empty(total, dtype=torch.float64, device=rows.device)
    if rows.numel() and total:
        _radius_kernel[(triton.cdiv(rows.numel(), BLOCK),)](
            rows, lat, lon, qxyz[0], qxyz[1], qxyz[2], rows.numel(), *src.args(), consts,
            counts, offsets, cap, out_q, out_src, out_d2, FILL=True, BLOCK=BLOCK,
            **_launch_options(),
        )  # fmt: skip
    return out_q, out_src, out_d2


@triton.jit
def _rank_kernel(q_ptr, src_ptr, d2_ptr, offset_ptr, kept_ptr, out_src_ptr, out_d2_ptr, n_edges,
                 BLOCK: tl.constexpr):  # fmt: skip
    """Move each edge to its rank by source index within its query's run (one lane per edge;
    a query's sources are distinct, so ranks are too)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_edges
    q = tl.load(q_ptr + e, mask=mask, other=0)
    s = tl.load(src_ptr + e, mask=mask, other=0)
    d = tl.load(d2_ptr + e, mask=mask, other=0.0)
    start = tl.load(offset_ptr + q, mask=mask, other=0)
    n = tl.load(kept_ptr + q, mask=mask, other=0)
    rank = tl.zeros([BLOCK], dtype=tl.int64)
    for j in range(0, tl.max(n, 0)):
        act = mask & (j < n)
        other = tl.load(src_ptr + start + j, mask=act, other=0)
        rank += (act & (other < s)).to(tl.int64)
    tl.store(out_src_ptr + start + rank, s, mask=mask)
    tl.store(out_d2_ptr + start + rank, d, mask=mask)


def sort_runs(query, source, d2, offsets, kept):
    """``source`` and ``d2`` ordered by source index within each query's run (runs ``offsets[q]``
    to ``offsets[q] + kept[q]``, as :func:`radius_fill` writes them)."""
    out_src, out_d2 = torch.empty_like(source), torch.empty_like(d2)
    if len(source):
        options = _launch_options()
        options.pop("INTERP")
        _rank_kernel[(triton.cdiv(len(source), BLOCK),)](
            query, source, d2, offsets, kept, out_src, out_d2, len(source), BLOCK=BLOCK, **options
        )  # fmt: skip
    return out_src, out_d2
