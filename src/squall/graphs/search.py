"""Exact k-nearest and radius search on the unit sphere, in torch on the GPU or the CPU.

Distances are chord lengths between unit vectors, compared as squared chords computed in float64
in one fixed order, ``d2 = ((dx * dx + dy * dy) + dz * dz)`` with ``d = source - query``: every
device (and the scipy path of :mod:`squall.graphs.edges`) computes the same bits, so results agree
exactly. Ties are broken by source index: neighbours are ordered by ``(d2, source index)``.

Sources are held in latitude *bands*, each sorted by longitude (:class:`SphereIndex`):

* structured grids (reduced Gaussian, octahedral, regular lat-lon: rows of equal latitude holding
  ``n`` points at longitudes ``2 pi j / n``) use their own rows as bands; a query's longitude
  window in a row is two integer ranges found by arithmetic;
* any other point set (mesh nodes, observations, cut-outs) is cut into bands of equal height
  sorted by ``(band, longitude)``; windows are found by binary search.

A query with search angle ``theta`` visits the bands within ``theta`` of its latitude and in each
the longitude window of the spherical cap at the band's latitudes (the whole band when the cap
holds a pole, so poles and the dateline need no special case). Every source within ``theta``
(plus :data:`MARGIN`) is a candidate. A k-nearest search accepts a query once its k-th candidate
lies strictly inside the cap, which proves no source outside is nearer; otherwise the cap grows
to the k-th candidate's distance (or doubles while fewer than k were found) and the query is
searched again. Queries are processed in groups sized so that candidate matrices stay within
:func:`candidate_budget` elements.

On CUDA, indexes of latitude bands (mesh nodes, observations) are searched by the Triton kernels
of :mod:`squall.kernels.sphere_search` (one fused pass per block of queries, no candidate
matrices; see :func:`use_kernel`); the torch code here is their reference, the CPU path and the
path of grid rows. Both give the same bits.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from squall.errors import GraphError
from squall.graphs.grids import latlon_to_xyz

TWO_PI = 2 * math.pi
HALF_PI = math.pi / 2
#: Angle (rad) added to every search window. Coordinates carry float64 rounding (~1e-16 rad) and
#: lat-lon grids place longitudes within 1e-12 rad of 2 pi j / n (degrees -> radians), so 1e-9
#: rad keeps every source within the search angle inside its window at no measurable cost.
MARGIN = 1e-9
#: A k-th neighbour is accepted when its squared chord is below ``ACCEPT`` times the squared chord
#: of the search angle: float64 rounding of d2 (a few 1e-16 relative) cannot then put an outside
#: source at or below it.
ACCEPT = 1.0 - 1e-12
#: Longitudes of a structured row may differ from ``2 pi j / n`` by this much (lat-lon grids built
#: from degrees differ by ~1e-15 rad); larger differences mean the rows are not regular.
_ROW_TOLERANCE = 1e-12
#: Expected sources in a first k-nearest cap, as a multiple of k: cap radius
#: ``sqrt(SEED * 4 k / N)`` (a cap holding ``SEED * k`` of N uniform points). Queries accepted in
#: the first round (O96 <-> level-6 mesh k=3 both ways, mesh to itself k=2): 2.25: 100 %, 100 %,
#: 100 %; 1.5: 100 %, 99.4 %, 0 % (the k=2 self-search needs the wider cap).
SEED = 2.25
#: Queries per group at most (per-query arrays of a group stay a few tens of MB).
MAX_GROUP_ROWS = 1 << 20


def candidate_budget(device: torch.device) -> int:
    """Candidate matrix elements per group: ``[rows, candidates]`` int64 + float64 arrays and their
    temporaries take ~100 bytes per element, so 2^25 is ~3 GB on a GPU and 2^21 ~200 MB on the
    CPU (where larger groups are no faster)."""
    return 1 << 25 if device.type == "cuda" else 1 << 21


def search_device() -> torch.device | None:
    """Device of the torch search, or ``None`` for the scipy KD-tree path.

    ``SQUALL_GRAPH_SEARCH``: ``auto`` (default: the GPU when there is one, else scipy), ``scipy``,
    ``cpu`` (torch on the CPU) or ``cuda``.
    """
    mode = os.environ.get("SQUALL_GRAPH_SEARCH", "auto").strip().lower()
    if mode == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    if mode == "scipy":
        return None
    if mode == "cpu":
        return torch.device("cpu")
    if mode == "cuda":
        if not torch.cuda.is_available():
            raise GraphError("SQUALL_GRAPH_SEARCH=cuda but no CUDA device is available")
        return torch.device("cuda")
    raise GraphError(f"SQUALL_GRAPH_SEARCH={mode!r}: choose auto, scipy, cpu or cuda")


def use_kernel(index: SphereIndex, k: int | None = None) -> bool:
    """Whether :func:`knn` / :func:`radius` run the Triton kernels
    (:mod:`squall.kernels.sphere_search`) rather than the torch path.

    ``SQUALL_SEARCH_KERNEL``: ``auto`` (default: on CUDA, for indexes of latitude bands; grid
    rows and ``k`` above the kernel's register budget take the torch path), ``0`` (always torch)
    or ``1`` (as ``auto``, and on the CPU through Triton's interpreter, ``TRITON_INTERPRET=1``:
    the tests' way to run the kernels without a GPU).
    """
    mode = os.environ.get("SQUALL_SEARCH_KERNEL", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise GraphError(f"SQUALL_SEARCH_KERNEL={mode!r}: choose auto, 0 or 1")
    if mode == "0" or index.structured:
        return False
    from squall.kernels import sphere_search

    if k is not None and k > sphere_search.MAX_K:
        return False
    if index.device.type == "cuda":
        return True
    if mode == "1":
        if not sphere_search.interpreting():
            raise GraphError("SQUALL_SEARCH_KERNEL=1 on the CPU needs TRITON_INTERPRET=1")
        return True
    return False


def _query_order(index: SphereIndex, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """Query rows in an order whose kernel blocks span few bands: the given order when blocks of
    consecutive queries already do (grid points row by row), else :func:`spatial_order`."""
    from squall.kernels.sphere_search import BLOCK

    n = len(lat)
    blocks = n // BLOCK
    if blocks:
        v = lat[: blocks * BLOCK].view(blocks, BLOCK)
        if float((v.amax(1) - v.amin(1)).mean()) * index.band_lo.numel() / math.pi < 1:
            return torch.arange(n, device=lat.device)
    return spatial_order(lat, lon)


def spatial_order(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """``[Q]`` int64 permutation of the queries sorting them by thin latitude bands, then
    longitude: bands of height ``2 * BLOCK / Q`` rad hold about one kernel block of queries
    each near the equator, so a block spans a latitude range far below any index's bands.
    Depends on the queries alone (a caller may compute it once for a fixed query set and pass
    it to :func:`radius` as ``query_order``)."""
    from squall.kernels.sphere_search import BLOCK

    inv_height = max(1.0, len(lat) / (2 * BLOCK))
    band = ((lat + HALF_PI) * inv_height).floor()
    return torch.argsort(band * 8 + torch.remainder(lon, TWO_PI))


def chord2(angle):
    """Squared chord of a central angle (tensor or float)."""
    half = angle / 2
    s = torch.sin(half) if isinstance(half, torch.Tensor) else math.sin(half)
    return 4 * s * s


def squared_chords(src_xyz: np.ndarray, dst_xyz: np.ndarray) -> np.ndarray:
    """``d2`` of paired rows in the module's fixed float64 order (numpy twin of the torch code)."""
    dx = src_xyz[..., 0] - dst_xyz[..., 0]
    dy = src_xyz[..., 1] - dst_xyz[..., 1]
    dz = src_xyz[..., 2] - dst_xyz[..., 2]
    return (dx * dx + dy * dy) + dz * dz


def _tensor(array, device) -> torch.Tensor:
    """float64 tensor on ``device`` from a numpy array or tensor."""
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=torch.float64)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(device)


def _points(latlon, xyz, device, what: str):
    """``lat``, ``lon`` ``[N]`` and ``xyz`` ``[3, N]`` float64 tensors on ``device``.

    Without ``xyz`` the unit vectors are computed from ``latlon`` as
    :func:`squall.graphs.grids.latlon_to_xyz` does: with numpy for a numpy array (the bits of
    ``NodeSet.xyz``, on every device), with torch on the tensor's device otherwise.
    """
    if tuple(latlon.shape[1:]) != (2,) or latlon.ndim != 2:
        raise GraphError(f"{what}: need an [N, 2] lat/lon array, got shape {tuple(latlon.shape)}")
    if xyz is None and not isinstance(latlon, torch.Tensor):
        xyz = latlon_to_xyz(np.asarray(latlon, dtype=np.float64))
    latlon = _tensor(latlon, device)
    lat, lon = latlon[:, 0].contiguous(), latlon[:, 1].contiguous()
    if xyz is None:
        cos_lat = torch.cos(lat)
        xyz = torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)])
    else:
        if tuple(xyz.shape) != (len(lat), 3):
            raise GraphError(f"{what}: xyz must be [{len(lat)}, 3], got {tuple(xyz.shape)}")
        xyz = _tensor(xyz, device).T.contiguous()
    return lat, lon, xyz


def regular_rows(lat: torch.Tensor, lon: torch.Tensor):
    """``(starts, counts, latitudes)`` of the rows when the points are a structured grid, else None.

    Structured: runs of equal latitude, strictly monotone from run to run, each holding ``n``
    points at longitudes ``2 pi j / n``, ``j = 0 .. n-1`` in order (within :data:`_ROW_TOLERANCE`).
    """
    n = len(lat)
    # rows of strictly monotone latitude make the whole array monotone: a cheap first test that
    # rejects scattered points (observations) before the per-row work
    if n > 1:
        step = lat[1:] - lat[:-1]
        if not bool(torch.stack([(step <= 0).all(), (step >= 0).all()]).any()):  # one sync
            return None
    change = torch.nonzero(lat[1:] != lat[:-1]).ravel() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=lat.device), change])
    counts = torch.diff(starts, append=torch.full((1,), n, device=lat.device))
    row_lat = lat[starts]
    step = torch.diff(row_lat)
    if len(step) and not (bool((step < 0).all()) or bool((step > 0).all())):
        return None
    per_point = torch.repeat_interleave(counts, counts)
    position = torch.arange(n, device=lat.device) - torch.repeat_interleave(starts, counts)
    expected = TWO_PI * position.to(torch.float64) / per_point.to(torch.float64)
    if float((lon - expected).abs().max()) > _ROW_TOLERANCE:
        return None
    return starts, counts, row_lat


@dataclass(frozen=True, eq=False)
class SphereIndex:
    """Sources held in latitude bands for :func:`knn` and :func:`radius`.

    Attributes
    ----------
    xyz : torch.Tensor
        ``[3, N]`` float64 unit vectors (x, y, z rows) in source order.
    order : torch.Tensor
        ``[N]`` int64 source index at each banded position (identity for structured grids).
    band_lo, band_hi : torch.Tensor
        ``[B]`` float64 latitude bounds of each band, ascending (equal for a grid row).
    band_start, band_count : torch.Tensor
        ``[B]`` int64 first banded position and number of sources of each band.
    key : torch.Tensor or None
        ``[N]`` float64 ``8 * band + longitude`` at each position, ascending (binary-search key);
        ``None`` for structured rows, whose windows are computed directly.
    """

    xyz: torch.Tensor
    order: torch.Tensor
    band_lo: torch.Tensor
    band_hi: torch.Tensor
    band_start: torch.Tensor
    band_count: torch.Tensor
    key: torch.Tensor | None
    num: int

    @property
    def device(self) -> torch.device:
        return self.xyz.device

    @property
    def structured(self) -> bool:
        return self.key is None

    @functools.cached_property
    def banded(self):
        """The search kernels' view of a banded index (sources in banded order and the longitude
        cell table, :class:`squall.kernels.sphere_search.BandedSources`), built on first use."""
        from squall.kernels.sphere_search import BandedSources

        return BandedSources(self)

    @classmethod
    def build(cls, latlon, device=None, band_height: float | None = None,
              xyz=None, rows: bool = True) -> SphereIndex:  # fmt: skip
        """Index the sources ``latlon`` (``[N, 2]`` radians, longitudes in ``[0, 2 pi)``).

        ``latlon`` and ``xyz`` (``[N, 3]`` unit vectors computed from ``latlon``; by default
        computed here, see :func:`_points`) are numpy arrays or tensors. ``band_height`` (rad)
        sets the bands of an unstructured set (default: the spacing of ``SEED * 4`` points);
        structured grids use their rows, unless ``rows`` is false (a caller that knows its
        points are scattered skips the test for rows, and its host sync).
        """
        device = torch.device(device or "cpu")
        if len(latlon) == 0:
            raise GraphError("sphere index: need a non-empty [N, 2] lat/lon array, got none")
        lat, lon, xyz_t = _points(latlon, xyz, device, "sphere index")
        n = len(lat)
        rows = regular_rows(lat, lon) if rows else None
        if rows is not None:
            starts, counts, row_lat = rows
            if len(row_lat) > 1 and bool(row_lat[1] < row_lat[0]):  # north to south: bands ascend
                starts, counts, row_lat = starts.flip(0), counts.flip(0), row_lat.flip(0)
            return cls(xyz_t, torch.arange(n, device=device), row_lat, row_lat, starts, counts,
                       None, n)  # fmt: skip
        if band_height is None:
            band_height = math.sqrt(SEED * 16 / n)
        bands = max(1, min(1 << 16, math.ceil(math.pi / max(band_height, 1e-12))))
        height = math.pi / bands
        band = ((lat + HALF_PI) / height).floor().clamp_(0, bands - 1).to(torch.int64)
        # 8 * band + longitude in [0, 2 pi): one ascending key; at 65,536 bands its spacing
        # (1.2e-10 rad) stays below MARGIN
        key = band.to(torch.float64) * 8 + torch.remainder(lon, TWO_PI)
        key, order = torch.sort(key, stable=True)
        band_ids = torch.arange(bands, device=device)
        start = torch.searchsorted(band[order], band_ids)
        count = torch.diff(start, append=torch.full((1,), n, device=device))
        lo = -HALF_PI + band_ids.to(torch.float64) * height
        hi = lo + height
        return cls(xyz_t, order, lo, hi, start, count, key, n)


def _groups(cost: np.ndarray, budget: int):
    """``(lo, hi)`` runs of ascending ``cost`` with ``(hi - lo) * cost[hi - 1] <= budget`` (at least
    one row each, at most :data:`MAX_GROUP_ROWS`)."""
    lo, n = 0, len(cost)
    while lo < n:
        a, b = lo + 1, min(n, lo + MAX_GROUP_ROWS)  # largest hi in [a, b] that fits
        while a < b:
            mid = (a + b + 1) // 2
            if (mid - lo) * max(int(cost[mid - 1]), 1) <= budget:
                a = mid
            else:
                b = mid - 1
        yield lo, a
        lo = a


def _band_range(index: SphereIndex, lat: torch.Tensor, theta: torch.Tensor):
    """First and last band within ``theta`` (+margin) of each latitude."""
    b0 = torch.searchsorted(index.band_hi, lat - theta - MARGIN)
    b1 = torch.searchsorted(index.band_lo, lat + theta + MARGIN, right=True) - 1
    return b0, b1


def _segments(index, lat, lon, theta, b0, nb: int):
    """Start and length ``[G, 2 * nb]`` of the banded positions in each query's window."""
    b = b0[:, None] + torch.arange(nb, device=lat.device)
    nbands = index.band_lo.numel()
    valid = b < nbands
    b = b.clamp(max=nbands - 1)
    th = (theta + MARGIN)[:, None]
    phi = lat[:, None]
    lo = torch.maximum(index.band_lo[b], phi - th)
    hi = torch.minimum(index.band_hi[b], phi + th)
    valid &= lo <= hi
    # Longitude half-width of the cap at latitude p: cos dl = (cos th - sin phi sin p) /
    # (cos phi cos p), largest at p* = asin(sin phi / cos th) (clamped to the band's part).
    p = torch.asin((torch.sin(phi) / torch.cos(th)).clamp(-1, 1))
    p = torch.minimum(torch.maximum(p, lo), hi)
    denom = torch.cos(phi) * torch.cos(p)
    cos_dl = (torch.cos(th) - torch.sin(phi) * torch.sin(p)) / denom.clamp(min=1e-300)
    dl = torch.acos(cos_dl.clamp(-1, 1)) + MARGIN
    full = (denom < 1e-12) | (cos_dl <= -1) | (phi.abs() + th >= HALF_PI) | (dl >= math.pi)
    start_b, count_b = index.band_start[b], index.band_count[b]
    lam = lon[:, None]
    if index.structured:
        nf = count_b.to(torch.float64)
        jlo = torch.ceil((lam - dl) * nf / TWO_PI).to(torch.int64)
        jhi = torch.floor((lam + dl) * nf / TWO_PI).to(torch.int64)
        length = (jhi - jlo + 1).clamp(min=0)
        full |= length >= count_b
        first = torch.remainder(jlo, count_b.clamp(min=1))
        first = torch.where(full, 0, first)
        length = torch.where(full, count_b, length)
        len_a = torch.minimum(length, count_b - first)
        start_a = start_b + first
    else:
        base = b.to(torch.float64) * 8
        west = torch.remainder(lam - dl, TWO_PI)
        east = west + 2 * dl
        wraps = east >= TWO_PI
        start_a = torch.searchsorted(index.key, base + west)
        end_a = torch.where(wraps, start_b + count_b,
                            torch.searchsorted(index.key, base + east, right=True))  # fmt: skip
        end_b = torch.searchsorted(index.key, base + (east - TWO_PI), right=True)
        start_a = torch.where(full, start_b, start_a)
        end_a = torch.where(full, start_b + count_b, end_a)
        len_a = end_a - start_a
        length = len_a + torch.where(wraps & ~full, end_b - start_b, 0)
    len_b = length - len_a
    zero = torch.zeros_like(len_a)
    start = torch.stack([start_a, start_b], 2).reshape(len(lat), 2 * nb)
    seg_len = torch.stack([torch.where(valid, len_a, zero), torch.where(valid, len_b, zero)], 2)
    return start, seg_len.reshape(len(lat), 2 * nb)


def _expand(index, start, seg_len, width: int):
    """Source indices ``[G, width]`` of the concatenated segments (``index.num`` past the end)."""
    cum = seg_len.cumsum(1)
    pos = torch.arange(width, device=start.device).expand(len(start), width).contiguous()
    seg = torch.searchsorted(cum, pos, right=True)
    inside = seg < seg_len.shape[1]
    seg = seg.clamp(max=seg_len.shape[1] - 1)
    offset = pos - (cum.gather(1, seg) - seg_len.gather(1, seg))
    banded = (start.gather(1, seg) + offset).clamp(0, index.num - 1)
    return torch.where(inside, index.order[banded], index.num)


def _distances(index, qxyz, rows, idx):
    """``d2`` ``[G, C]`` from queries ``rows`` to sources ``idx`` (inf where ``idx`` is past the end)."""
    safe = idx.clamp(max=index.num - 1)
    d2 = None
    for axis in range(3):
        d = index.xyz[axis][safe] - qxyz[axis][rows][:, None]
        d2 = d * d if d2 is None else d2.add_(d * d)
    return d2.masked_fill_(idx >= index.num, math.inf)


def _candidates(index, qxyz, lat, lon, rows, theta):
    """Yield ``(rows, theta, idx [G, C], d2 [G, C])`` over groups of the queries ``rows``."""
    budget = candidate_budget(index.device)
    b0, b1 = _band_range(index, lat[rows], theta)
    nb = (b1 - b0 + 1).clamp(min=1)
    order = torch.argsort(nb)
    rows, theta, b0, nb = rows[order], theta[order], b0[order], nb[order]
    nb_host = nb.cpu().numpy()
    for lo, hi in _groups(2 * nb_host, budget):
        g_rows, g_theta = rows[lo:hi], theta[lo:hi]
        start, seg_len = _segments(index, lat[g_rows], lon[g_rows], g_theta, b0[lo:hi],
                                   int(nb_host[hi - 1]))  # fmt: skip
        count = seg_len.sum(1)
        by_count = torch.argsort(count)
        count_host = count[by_count].cpu().numpy()
        for clo, chi in _groups(count_host, budget):
            sub = by_count[clo:chi]
            width = max(int(count_host[chi - 1]), 1)
            idx = _expand(index, start[sub], seg_len[sub], width)
            yield g_rows[sub], g_theta[sub], idx, _distances(index, qxyz, g_rows[sub], idx)


def _smallest(idx, d2, k: int):
    """The ``k`` nearest candidates of each row ordered by ``(d2, idx)``: ``(idx, d2)`` ``[G, k]``."""
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = torch.nn.functional.pad(idx, (0, pad), value=torch.iinfo(torch.int64).max)
        d2 = torch.nn.functional.pad(d2, (0, pad), value=math.inf)
    kth = torch.topk(d2, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    # Rank: every candidate nearer than the k-th value first (-1), then ties by source index.
    rank = torch.where(d2 < kth, torch.full_like(idx, -1),
                       torch.where(d2 == kth, idx, torch.iinfo(torch.int64).max))  # fmt: skip
    pick = torch.topk(rank, k, dim=1, largest=False, sorted=False).indices
    idx, d2 = idx.gather(1, pick), d2.gather(1, pick)
    by_idx = torch.sort(idx, dim=1).indices
    idx, d2 = idx.gather(1, by_idx), d2.gather(1, by_idx)
    by_d2 = torch.sort(d2, dim=1, stable=True).indices
    return idx.gather(1, by_d2), d2.gather(1, by_d2)


def knn(
    index: SphereIndex, query_latlon, k: int, query_xyz=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest sources of each query, ordered by ``(d2, source index)``.

    Parameters
    ----------
    index : SphereIndex
        The sources.
    query_latlon : np.ndarray or torch.Tensor
        ``[Q, 2]`` float64 latitude and longitude (radians).
    k : int
        Neighbours per query, ``1 <= k <= N``.
    query_xyz : np.ndarray or torch.Tensor, optional
        ``[Q, 3]`` unit vectors of the queries, when already computed (see :func:`_points`).

    Returns
    -------
    idx, d2 : torch.Tensor
        ``[Q, k]`` int64 source indices and float64 squared chords, on the index's device.
    """
    if not 1 <= k <= index.num:
        raise GraphError(f"k-nearest search: k={k} must be between 1 and the number of sources "
                         f"({index.num})")  # fmt: skip
    device = index.device
    lat, lon, qxyz = _points(query_latlon, query_xyz, device, "k-nearest search")
    q = len(lat)
    out_idx = torch.empty((q, k), dtype=torch.int64, device=device)
    out_d2 = torch.empty((q, k), dtype=torch.float64, device=device)
    angle = min(math.pi, math.sqrt(SEED * 4 * k / index.num))
    if use_kernel(index, k):
        return _knn_kernel(index, lat, lon, qxyz, angle, k, out_idx, out_d2)
    rows = torch.arange(q, device=device)
    theta = torch.full((q,), angle, dtype=torch.float64, device=device)
    while rows.numel():
        retry_rows, retry_theta = [], []
        for g_rows, g_theta, idx, d2 in _candidates(index, qxyz, lat, lon, rows, theta):
            s_idx, s_d2 = _smallest(idx, d2, k)
            done, grown = _accept(s_d2[:, -1], g_theta)
            out_idx[g_rows[done]] = s_idx[done]
            out_d2[g_rows[done]] = s_d2[done]
            miss = ~done
            retry_rows.append(g_rows[miss])
            retry_theta.append(grown[miss])
        rows, theta = torch.cat(retry_rows), torch.cat(retry_theta)
    return out_idx, out_d2


def _accept(kth: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which queries of search angle ``theta`` and ``k``-th candidate ``kth`` are done, and the
    angle of the next round for the others."""
    done = (kth <= chord2(theta) * ACCEPT) | (theta >= math.pi)
    # Grow to the k-th candidate (the next round then holds k sources inside its cap), or
    # double while fewer than k were found.
    reach = 2 * torch.asin((kth.clamp(max=4.0).sqrt() / 2).clamp(max=1.0))
    grown = torch.where(torch.isfinite(kth), reach * (1 + 1e-6) + 2 * MARGIN, 2 * theta)
    return done, grown.clamp(max=math.pi)


def _knn_kernel(index, lat, lon, qxyz, theta, k, out_idx, out_d2):
    """:func:`knn` through the Triton kernel: rounds over the queries not yet accepted, with
    the same acceptance and widening as the torch path (one host sync per round)."""
    from squall.kernels.sphere_search import knn_rows

    src = index.banded
    rows = _query_order(index, lat, lon)
    while rows.numel():  # theta: the first angle (a float), then each retried row's
        kth = knn_rows(src, rows, theta, lat, lon, qxyz, k, out_idx, out_d2)
        done = (kth <= chord2(theta) * ACCEPT) | (theta >= math.pi)  # as _accept
        if bool(done.all()):
            break
        miss = ~done  # rows not done are written again next round
        theta = theta[miss] if isinstance(theta, torch.Tensor) else theta
        rows, theta = rows[miss], _accept(kth[miss], theta)[1]
    return out_idx, out_d2


def radius(index: SphereIndex, query_latlon, r: float, max_neighbours: int | None = None,
           query_xyz=None, query_order: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Every source with chord distance ``<= r`` of each query (``d2 <= r * r``).

    With ``max_neighbours``, each query keeps its nearest ``max_neighbours`` by ``(d2, index)``.
    Inputs as for :func:`knn`; ``query_order`` (the kernels' order of the queries, e.g.
    :func:`spatial_order` kept for a fixed query set) only changes the speed of the kernels.

    Returns
    -------
    query, source, d2 : torch.Tensor
        ``[E]`` int64, int64, float64 pairs sorted by query, then source index.
    """
    if not r >= 0:
        raise GraphError(f"radius search: radius must be >= 0, got {r}")
    if max_neighbours is not None and max_neighbours < 1:
        raise GraphError(f"radius search: max_neighbours must be >= 1, got {max_neighbours}")
    device = index.device
    lat, lon, qxyz = _points(query_latlon, query_xyz, device, "radius search")
    q = len(lat)
    r2 = float(r) * float(r)
    angle = min(math.pi, 2 * math.asin(min(r / 2, 1.0)))
    if use_kernel(index):
        return _radius_kernel(index, lat, lon, qxyz, r2, angle, max_neighbours, query_order)
    theta = torch.full((q,), angle, dtype=torch.float64, device=device)
    return _radius_torch(index, lat, lon, qxyz, r2, theta, max_neighbours)


def _radius_kernel(index, lat, lon, qxyz, r2, theta, max_neighbours, order=None):
    """:func:`radius` through the Triton kernels: count, exclusive sum, fill, then each query's
    run ordered by source index. Queries with more than ``max_neighbours`` sources within the radius (rare:
    the cap bounds dense clusters) take the torch path. Two host syncs."""
    from squall.kernels.sphere_search import radius_counts, radius_fill, sort_runs

    device, q = lat.device, len(lat)
    src = index.banded
    rows = _query_order(index, lat, lon) if order is None else order
    if len(rows) != q:
        raise GraphError(f"radius search: query_order has {len(rows)} rows for {q} queries")
    counts, consts = radius_counts(src, rows, theta, r2, lat, lon, qxyz, q)
    cap = counts.numel() + index.num if max_neighbours is None else max_neighbours
    kept = counts.clamp(max=cap)
    offsets = torch.cumsum(kept, 0) - kept
    total, over = (int(v) for v in torch.stack([kept.sum(), (counts > cap).sum()]).tolist())
    query, source, dist2 = radius_fill(src, rows, consts, lat, lon, qxyz, counts, offsets, cap,
                                       total)  # fmt: skip
    if over:
        heavy = torch.nonzero(counts > cap).ravel()
        h_q, h_s, h_d2 = _radius_torch(index, lat[heavy], lon[heavy], qxyz[:, heavy], r2,
                                       torch.full((len(heavy),), theta, dtype=torch.float64,
                                                  device=device), max_neighbours)  # fmt: skip
        rank = torch.arange(len(h_q), device=device) - torch.searchsorted(h_q, h_q)
        at = offsets[heavy[h_q]] + rank
        query[at], source[at], dist2[at] = heavy[h_q], h_s, h_d2
    # within a query the fill wrote window order (band, longitude): order by source index
    source, dist2 = sort_runs(query, source, dist2, offsets, kept)
    return query, source, dist2


def _radius_torch(index, lat, lon, qxyz, r2, theta, max_neighbours):
    """:func:`radius` on the torch path."""
    device, q = lat.device, len(lat)
    parts = []
    counts = torch.zeros(q, dtype=torch.int64, device=device)
    for g_rows, _, idx, d2 in _candidates(index, qxyz, lat, lon, torch.arange(q, device=device),
                                          theta):  # fmt: skip
        if max_neighbours is not None and idx.shape[1] > max_neighbours:
            idx, d2 = _smallest(idx, d2, max_neighbours)
        inside = d2 <= r2
        key = torch.where(inside, idx, torch.iinfo(torch.int64).max)
        key, by_idx = torch.sort(key, dim=1)
        count = inside.sum(1)
        width = int(count.max()) if count.numel() else 0
        key, d2 = key[:, :width], d2.gather(1, by_idx[:, :width])
        keep = torch.arange(width, device=device) < count[:, None]
        counts[g_rows] = count
        parts.append(
            (
                g_rows.repeat_interleave(count),
                key[keep],
                d2[keep],
                torch.arange(width, device=device).expand(len(keep), width)[keep],
            )
        )
    offsets = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    query = torch.empty(total, dtype=torch.int64, device=device)
    source = torch.empty(total, dtype=torch.int64, device=device)
    dist2 = torch.empty(total, dtype=torch.float64, device=device)
    for g_q, g_s, g_d2, g_rank in parts:
        at = offsets[g_q] + g_rank
        query[at], source[at], dist2[at] = g_q, g_s, g_d2
    return query, source, dist2


def brute_force_knn(src_xyz: torch.Tensor, dst_xyz: torch.Tensor, k: int,
                    chunk: int = 1 << 14) -> torch.Tensor:  # fmt: skip
    """Baseline: ``cdist`` + ``topk`` over blocks of ``chunk`` queries (``[N, 3]``/``[Q, 3]``
    tensors); no tie rule, for timing only."""
    out = []
    for lo in range(0, len(dst_xyz), chunk):
        d = torch.cdist(dst_xyz[lo : lo + chunk], src_xyz)
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out) if out else torch.empty((0, k), dtype=torch.int64)
