"""Node sets on the sphere: Gaussian and lat-lon grids, icosahedral meshes, stretched and LAM sets.

Every builder returns a :class:`NodeSet` whose coordinates are latitudes and longitudes in radians
(float64, longitudes in [0, 2*pi)). Grid points are ordered from north to south, west to east from
longitude 0, as in ECMWF's GRIB ordering; mesh nodes keep the order of refinement, so the nodes of
refinement level ``l`` are the first ``10 * 4**l + 2`` nodes of any finer level.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from squall.errors import GraphError


@dataclass(frozen=True, eq=False)
class NodeSet:
    """Points on the unit sphere.

    Attributes
    ----------
    name : str
        Identifier of the set inside its graph (``"data"``, ``"hidden"``, ...).
    latlon : np.ndarray
        ``[N, 2]`` float64 latitude and longitude in radians.
    area : np.ndarray
        ``[N]`` float64 area weight of each point, normalised to mean 1 (used by area-weighted losses).
    mesh_levels : np.ndarray or None
        For icosahedral sets, ``[N]`` int8 coarsest refinement level at which each node exists.
    faces : np.ndarray or None
        For icosahedral sets, ``[F, 3]`` int64 triangles of the finest level (node indices).
    """

    name: str
    latlon: np.ndarray
    area: np.ndarray
    mesh_levels: np.ndarray | None = None
    faces: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latlon.shape[0])

    @property
    def xyz(self) -> np.ndarray:
        """``[N, 3]`` float64 unit vectors, computed on first access and kept (a graph build reads
        the O1280 grid's 6.6 M vectors four times, ~0.2 s each); callers must not modify it.

        Kept without a lock (``functools.cached_property`` of Python 3.11 holds one lock for every
        instance, which would queue node sets built on concurrent threads): two threads asking
        at once both compute the same array."""
        xyz = self.__dict__.get("_xyz")
        if xyz is None:
            xyz = self.__dict__["_xyz"] = latlon_to_xyz(self.latlon)
        return xyz

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``latlon`` ``[N, 2]`` and :attr:`xyz` ``[N, 3]`` as float64 tensors on ``device``: the
        host arrays' bits, copied once and kept until :meth:`drop_device` (a graph build reads
        the O1280 grid's 6.6 M points in two searches and two attribute passes)."""
        copies = self.__dict__.setdefault("_device_copies", {})
        key = str(torch.device(device))
        if key not in copies:
            copies[key] = tuple(
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
                for a in (self.latlon, self.xyz)
            )
        return copies[key]

    def drop_device(self) -> None:
        """Free the device copies made by :meth:`on_device`."""
        self.__dict__.pop("_device_copies", None)


#: Points from which :func:`latlon_to_xyz` splits its work over threads (numpy's ufuncs release
#: the GIL); a block of 2^18 points is ~10 ms of sines and cosines on one core.
THREAD_BLOCK = 1 << 18
#: Threads at most for host array work (the o1280 grid's unit vectors: 26 blocks).
MAX_THREADS = 16


def host_threads() -> int:
    """Threads for host array work: the cores this process may use, at most :data:`MAX_THREADS`."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))


def latlon_to_xyz(latlon: np.ndarray) -> np.ndarray:
    """``[N, 3]`` float64 unit vectors of ``[N, 2]`` latitudes and longitudes (radians).

    Large sets are computed in blocks of :data:`THREAD_BLOCK` points on :func:`host_threads`
    threads; every element goes through the same ufunc calls on the same kind of (strided) view,
    so the bits equal one call's.
    """
    out = np.empty((len(latlon), 3), dtype=np.float64)

    def block(lo: int) -> None:
        part = latlon[lo : lo + THREAD_BLOCK]
        lat, lon = part[:, 0], part[:, 1]
        cos_lat = np.cos(lat)
        out[lo : lo + THREAD_BLOCK, 0] = cos_lat * np.cos(lon)
        out[lo : lo + THREAD_BLOCK, 1] = cos_lat * np.sin(lon)
        out[lo : lo + THREAD_BLOCK, 2] = np.sin(lat)

    starts = range(0, len(latlon), THREAD_BLOCK)
    threads = min(host_threads(), len(starts))
    if threads <= 1:
        for lo in starts:
            block(lo)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(block, starts))
    return out


def xyz_to_latlon(xyz: np.ndarray) -> np.ndarray:
    xyz = xyz / np.linalg.norm(xyz, axis=1, keepdims=True)
    lat = np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0))
    lon = np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]), 2 * np.pi)
    return np.stack([lat, lon], axis=1)


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.mean()


# ----------------------------------------------------------------------------------------------
# Gaussian and regular grids
# ----------------------------------------------------------------------------------------------


#: Newton steps in float64 stop once the largest step is below this (x = sin(latitude)): the
#: convergence is quadratic, so the next error is at float64 rounding (measured from Tricomi's
#: guess, N = 1280: steps of 1.4e-9, 2.3e-12, then 1e-16; N = 32: 2.2e-6, 3.5e-9, 9e-15, 1e-16).
_NEWTON_STOP = 1e-10
#: A bound on the float64 Newton steps (N = 32 .. 1280 take 2 to 4).
_NEWTON_MAX_STEPS = 20


def _legendre(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``P_m(x), P_{m-1}(x), P_{m-2}(x)`` by the three-term recurrence, in ``x``'s dtype."""
    p2, p1, p0 = np.zeros_like(x), np.ones_like(x), x.copy()  # P_{k-2}, P_{k-1}, P_k at k = 1
    for k in range(1, m):
        p2, p1, p0 = p1, p0, ((2 * k + 1) * x * p0 - k * p1) / (k + 1)
    return p0, p1, p2


@functools.lru_cache(maxsize=4)
def _gauss_legendre_half(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive roots of ``P_m`` (descending) and their Gauss-Legendre weights, float64.

    Newton's method on the three-term recurrence, vectorised over the roots (O(m^2) in all), from
    Tricomi's asymptotic guess ``x_k = (1 - (m - 1) / (8 m^3)) cos(pi (4k - 1) / (4m + 2))``;
    float64 steps until they fall below :data:`_NEWTON_STOP`, then one step in extended precision
    (``np.longdouble``: 64-bit mantissa on x86) rounds the roots to their nearest float64. The
    weights ``2 (1 - x^2) / (m P_{m-1}(x))^2`` use ``P_{m-1}`` at the refined root (first-order
    Taylor from the last evaluation). Where ``longdouble`` is float64, roots stay within the
    float64 Newton noise (at most 20 ulps at m = 2560, measured).
    """
    k = np.arange(1, m // 2 + 1, dtype=np.float64)
    x = (1.0 - (m - 1) / (8.0 * m**3)) * np.cos(np.pi * (4 * k - 1) / (4 * m + 2))
    for _ in range(_NEWTON_MAX_STEPS):
        p, q, _ = _legendre(x, m)
        step = p * ((1.0 - x) * (1.0 + x)) / (m * (q - x * p))  # P_m / P_m'
        x = x - step
        if np.abs(step).max() < _NEWTON_STOP:
            break
    else:
        raise GraphError(f"Gaussian latitudes: Newton's method did not converge for {m} roots")
    xe = x.astype(np.longdouble)
    p, q, r = _legendre(xe, m)
    one_minus_x2 = (1 - xe) * (1 + xe)
    dp = m * (q - xe * p) / one_minus_x2  # P_m'
    dq = (m - 1) * (r - xe * q) / one_minus_x2  # P_{m-1}'
    step = p / dp
    xe, q = xe - step, q - dq * step
    weights = 2 * ((1 - xe) * (1 + xe)) / (m * q) ** 2
    return xe.astype(np.float64), weights.astype(np.float64)


def gaussian_latitudes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``2n`` Gaussian latitudes (radians, north to south) and their quadrature weights.

    The roots ``x = sin(latitude)`` of the Legendre polynomial ``P_2n`` and the Gauss-Legendre
    weights (summing to 2) in O(n^2) (:func:`_gauss_legendre_half`; N = 1280 in ~0.3 s, where
    numpy's ``leggauss``, a dense eigensolver, takes 1-10 s). Latitudes and weights are exactly
    symmetric about the equator. Against ``leggauss``, ``sin(latitude)`` differs by at most a few
    ulps and weights by leggauss's own error (up to 1e-7 relative next to the poles at N = 1280).
    """
    x, w = _gauss_legendre_half(2 * n)
    lat = np.arcsin(x)
    return np.concatenate([lat, -lat[::-1]]), np.concatenate([w, w[::-1]])


def octahedral_gaussian(n: int, name: str = "data") -> NodeSet:
    """Octahedral reduced Gaussian grid O<n>: ``4 n (n + 9)`` points.

    Row ``i`` counted from either pole (``i = 1 .. n``) holds ``4 i + 16`` equally spaced points
    starting at longitude 0.
    """
    if n < 1:
        raise GraphError(f"octahedral grid O{n}: resolution must be a positive integer")
    lats, weights = gaussian_latitudes(n)
    rows = np.arange(1, n + 1)
    counts = np.concatenate([4 * rows + 16, (4 * rows + 16)[::-1]])
    return _reduced_grid(lats, weights, counts, name, {"grid": f"O{n}"})


def _reduced_grid(lats, weights, counts, name, meta) -> NodeSet:
    """Rows of ``counts[i]`` points at latitude ``lats[i]`` and longitudes ``2 pi j / counts[i]``
    (computed once per distinct row length: rows come in north/south pairs)."""
    latlon = np.empty((int(counts.sum()), 2), dtype=np.float64)
    latlon[:, 0] = np.repeat(lats, counts)
    rows: dict[int, np.ndarray] = {}
    start = 0
    for c in counts.tolist():
        if c not in rows:
            rows[c] = 2 * np.pi * np.arange(c) / c
        latlon[start : start + c, 1] = rows[c]
        start += c
    area = np.repeat(weights / counts, counts)
    return NodeSet(name, latlon, _normalised(area), meta=meta)


def latlon_grid(resolution_deg: float, name: str = "data", bounds=None) -> NodeSet:
    """Regular lat-lon grid with spacing ``resolution_deg`` including both poles.

    ``bounds = (lat_min, lat_max, lon_min, lon_max)`` in degrees restricts it to a box (a regional
    grid); longitudes of the box may wrap (``lon_min > lon_max``).
    """
    if not resolution_deg > 0 or 180.0 / resolution_deg != round(180.0 / resolution_deg):
        raise GraphError(
            f"lat-lon grid: resolution {resolution_deg} deg must be positive and divide 180"
        )
    n_lat = round(180.0 / resolution_deg) + 1
    lats = np.linspace(90.0, -90.0, n_lat)
    lons = np.arange(round(360.0 / resolution_deg)) * resolution_deg
    lat, lon = np.meshgrid(lats, lons, indexing="ij")
    latlon = np.radians(np.stack([lat.ravel(), lon.ravel()], axis=1))
    area = np.cos(latlon[:, 0])
    area[np.abs(lat.ravel()) == 90.0] = np.sin(np.radians(resolution_deg / 4)) ** 2  # pole caps
    nodes = NodeSet(name, latlon, _normalised(area), meta={"grid": f"latlon_{resolution_deg}"})
    return cut_out(nodes, bounds) if bounds is not None else nodes


# ----------------------------------------------------------------------------------------------
# Icosahedral meshes
# ----------------------------------------------------------------------------------------------


def _icosahedron() -> tuple[np.ndarray, np.ndarray]:
    phi = (1 + 5**0.5) / 2
    verts = np.array(
        [
            [-1, phi, 0], [1, phi, 0], [-1, -phi, 0], [1, -phi, 0],
            [0, -1, phi], [0, 1, phi], [0, -1, -phi], [0, 1, -phi],
            [phi, 0, -1], [phi, 0, 1], [-phi, 0, -1], [-phi, 0, 1],
        ],
        dtype=np.float64,
    )  # fmt: skip
    faces = np.array(
        [
            [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
            [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
            [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
            [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
        ],
        dtype=np.int64,
    )  # fmt: skip
    return verts / np.linalg.norm(verts, axis=1, keepdims=True), faces


def face_edges(faces: np.ndarray) -> np.ndarray:
    """Unique undirected edges ``[M, 2]`` (smaller index first) of a triangle list."""
    pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    return _unique_pairs(pairs)[0]


def _unique_pairs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected pairs (sorted within each pair) and the inverse map, via int64 keys
    (one 1-D sort; ``np.unique(axis=0)`` is several times slower at level 8)."""
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    n = int(hi.max()) + 1
    keys, inverse = np.unique(lo * n + hi, return_inverse=True)
    return np.stack([keys // n, keys % n], axis=1), inverse.ravel()


@functools.lru_cache(maxsize=2)
def icosahedral_levels(level: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unit vectors of the level-``level`` tri-refined icosahedron and the faces of every level.

    Each refinement splits every triangle into four through its edge midpoints; new nodes are
    appended, so level ``l`` nodes are a prefix of level ``l + 1`` nodes. Results are cached (a
    graph asks for the same mesh for its nodes and its multi-scale edges): do not modify them.
    """
    if level < 0:
        raise GraphError(f"icosahedral mesh: level must be >= 0, got {level}")
    xyz, faces = _icosahedron()
    all_faces = [faces]
    for _ in range(level):
        pairs = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        edges, inverse = _unique_pairs(pairs)
        inverse = inverse.reshape(3, -1)  # midpoint id of edges (01, 12, 20) per face
        mid = xyz[edges[:, 0]] + xyz[edges[:, 1]]
        xyz = np.concatenate([xyz, mid / np.linalg.norm(mid, axis=1, keepdims=True)])
        m01, m12, m20 = (len(xyz) - len(edges)) + inverse
        a, b, c = faces.T
        faces = np.concatenate(
            [
                np.stack([a, m01, m20], 1),
                np.stack([b, m12, m01], 1),
                np.stack([c, m20, m12], 1),
                np.stack([m01, m12, m20], 1),
            ]
        )
        all_faces.append(faces)
    return xyz, all_faces


def icosahedral_mesh(level: int, name: str = "hidden") -> NodeSet:
    """Icosahedral mesh of refinement level ``level``: ``10 * 4**level + 2`` nodes."""
    xyz, all_faces = icosahedral_levels(level)
    counts = [10 * 4**lvl + 2 for lvl in range(level + 1)]
    levels = np.searchsorted(np.asarray(counts), np.arange(len(xyz)), side="right").astype(np.int8)
    latlon = xyz_to_latlon(xyz)
    return NodeSet(
        name,
        latlon,
        _normalised(_vertex_areas(xyz, all_faces[-1])),
        mesh_levels=levels,
        faces=all_faces[-1],
        meta={"mesh": f"icosahedral_l{level}"},
    )


def _vertex_areas(xyz: np.ndarray, faces: np.ndarray) -> np.ndarray:
    a, b, c = xyz[faces[:, 0]], xyz[faces[:, 1]], xyz[faces[:, 2]]
    tri = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    return np.bincount(faces.ravel(), weights=np.repeat(tri / 3, 3), minlength=len(xyz))


# ----------------------------------------------------------------------------------------------
# Regional selections: limited-area cut-outs and stretched grids
# ----------------------------------------------------------------------------------------------


def in_box(latlon: np.ndarray, bounds) -> np.ndarray:
    """Mask of points inside ``bounds = (lat_min, lat_max, lon_min, lon_max)`` (degrees)."""
    lat_min, lat_max, lon_min, lon_max = (float(b) for b in bounds)
    if not -90 <= lat_min < lat_max <= 90:
        raise GraphError(f"region {bounds}: need -90 <= lat_min < lat_max <= 90")
    lat, lon = np.degrees(latlon[:, 0]), np.degrees(latlon[:, 1])
    # Points on the box edge count as inside despite degree/radian round trips.
    tol = 1e-9
    lat_min, lat_max, lon_min, lon_max = lat_min - tol, lat_max + tol, lon_min - tol, lon_max + tol
    lon_min, lon_max = lon_min % 360, lon_max % 360
    lat_ok = (lat >= lat_min) & (lat <= lat_max)
    if lon_min <= lon_max:
        return lat_ok & (lon >= lon_min) & (lon <= lon_max)
    return lat_ok & ((lon >= lon_min) | (lon <= lon_max))


def select(nodes: NodeSet, mask: np.ndarray, name: str | None = None, meta=None) -> NodeSet:
    """The subset of ``nodes`` where ``mask`` holds, order kept (mesh levels kept, faces dropped)."""
    if not mask.any():
        raise GraphError(f"node set {nodes.name!r}: the selection keeps no node")
    return NodeSet(
        name or nodes.name,
        nodes.latlon[mask],
        _normalised(nodes.area[mask]),
        mesh_levels=None if nodes.mesh_levels is None else nodes.mesh_levels[mask],
        meta={**nodes.meta, **(meta or {})},
    )


def cut_out(nodes: NodeSet, bounds) -> NodeSet:
    """Limited-area cut-out: the points of ``nodes`` inside a lat/lon box."""
    return select(nodes, in_box(nodes.latlon, bounds), meta={"region": list(bounds)})


def stretched(fine: NodeSet, coarse: NodeSet, bounds, name: str = "data") -> NodeSet:
    """Stretched set: ``fine`` points inside the region followed by ``coarse`` points outside it.

    As in the MetNo stretched-grid model: a high-resolution regional grid embedded in a global
    coarse grid. The first ``meta["num_fine"]`` nodes are the regional ones.
    """
    inner = fine.latlon[in_box(fine.latlon, bounds)]
    outer_mask = ~in_box(coarse.latlon, bounds)
    if len(inner) == 0:
        raise GraphError(f"stretched grid: no fine point lies inside region {list(bounds)}")
    # Area weights: each part keeps its own resolution's weights, scaled by its point spacing.
    fine_w = fine.area[in_box(fine.latlon, bounds)] * (len(coarse) / len(fine))
    area = np.concatenate([fine_w, coarse.area[outer_mask]])
    return NodeSet(
        name,
        np.concatenate([inner, coarse.latlon[outer_mask]]),
        _normalised(area),
        meta={"region": list(bounds), "num_fine": int(len(inner))},
    )


def point_set(lat_deg, lon_deg, name: str = "obs") -> NodeSet:
    """Arbitrary points (observations, stations) from latitude/longitude arrays in degrees."""
    lat = np.asarray(lat_deg, dtype=np.float64).ravel()
    lon = np.asarray(lon_deg, dtype=np.float64).ravel()
    if lat.shape != lon.shape or lat.size == 0:
        raise GraphError(
            f"point set {name!r}: need equal, non-empty latitude/longitude arrays, "
            f"got {lat.size} and {lon.size}"
        )
    if np.any(~np.isfinite(lat)) or np.any(np.abs(lat) > 90):
        raise GraphError(f"point set {name!r}: latitudes must be finite and within [-90, 90]")
    latlon = np.radians(np.stack([lat, np.mod(lon, 360.0)], axis=1))
    return NodeSet(name, latlon, np.ones(lat.size), meta={"points": int(lat.size)})


_GRID_NAME = re.compile(r"^(?:(?P<o>[oO])(?P<n>\d+)|(?P<ll>\d+(?:\.\d+)?)(?:deg)?)$")


def grid_from_name(grid: str, name: str = "data") -> NodeSet:
    """A global grid from its usual name: ``"O96"``, ``"o320"``, ``"1.0"``/``"0.25deg"`` (lat-lon)."""
    match = _GRID_NAME.match(str(grid).strip())
    if match is None:
        raise GraphError(
            f"unknown grid {grid!r}: use O<N> (octahedral reduced Gaussian, e.g. O96) or a "
            "lat-lon spacing in degrees (e.g. 1.0 or 0.25deg)"
        )
    if match["o"]:
        return octahedral_gaussian(int(match["n"]), name)
    return latlon_grid(float(match["ll"]), name)
