"""Edge builders between node sets: cutoff radius, k nearest neighbours, multi-scale mesh edges.

Every builder returns ``(src, dst)`` int64 arrays of directed edges ``src -> dst``; the searches
return them sorted by destination, then source, the order that
:class:`squall.graphs.graph.EdgeSet` sorts them into. Distances between unit vectors are chord
lengths (``2 sin(angle / 2)``), monotone in great-circle distance, compared as squared chords
computed as :func:`squall.graphs.search.squared_chords` does; equal distances are broken by the
smaller source index, so every path builds the same edges.

Two search paths (``SQUALL_GRAPH_SEARCH``, see :func:`squall.graphs.search.search_device`): the
torch search of :mod:`squall.graphs.search` (by default when a GPU is present) and scipy
KD-trees on all host cores (by default without one).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from squall.errors import GraphError
from squall.graphs import search
from squall.graphs.grids import (
    NodeSet,
    face_edges,
    icosahedral_levels,
    latlon_to_xyz,
    xyz_to_latlon,
)

# scipy's KD-tree parallelises queries over all cores with workers=-1.
_WORKERS = -1
#: Destinations per step of a k-nearest search on the CPU, so that big ones (the o1280 decoder:
#: 6.6 M grid points) show their progress: on 2 cores the o1280 decoder takes 101 steps of 0.18 s
#: (median), 25 s against 21 s in one search; graphs up to o96 search in one step.
SEARCH_CHUNK = 1 << 16
#: Destinations per step on a GPU: a block of 2^20 keeps the device busy (a block of 2^16 is a
#: few milliseconds, launch-bound) and the o1280 decoder shows 7 steps.
DEVICE_SEARCH_CHUNK = 1 << 20
#: Sources kept per destination of a cutoff edge set when its spec sets no ``max_neighbours``
#: (nearest first, ties by source index): Anemoi's default cap. The radius comes from the
#: coarsest mesh spacing, so without a cap the fine mesh nodes of a stretched graph gather
#: hundreds of grid points (stretched_nordic: up to 306, 354,841 edges; 139,788 with the cap).
#: Uniform global graphs stay far below it (measured: o32_l4 at most 20, o96_l6 at most 7), so
#: the cap leaves them unchanged. ``max_neighbours: null`` in a spec keeps every source in range.
DEFAULT_MAX_NEIGHBOURS = 64


def _chunk_size() -> int:
    device = search.search_device()
    return DEVICE_SEARCH_CHUNK if device is not None and device.type == "cuda" else SEARCH_CHUNK


def search_steps(spec: dict, dst: NodeSet) -> int:
    """Progress steps of building the edge set ``spec`` into ``dst``: the blocks of a k-nearest
    search (:data:`SEARCH_CHUNK` destinations, :data:`DEVICE_SEARCH_CHUNK` on a GPU), else one."""
    if spec.get("type") == "knn":
        return max(1, -(-len(dst) // _chunk_size()))
    return 1


def _chunks(n: int, size: int):
    """``(start, stop)`` of each block of ``size`` destinations."""
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


def nearest(src: NodeSet, dst: NodeSet, k: int,
            step: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The ``k`` nearest sources of every destination, ordered by ``(d2, source index)``.

    Returns ``[len(dst), k]`` int64 source indices and float64 squared chords, the same on every
    search path. ``step`` is called after each block of destinations.
    """
    if not 1 <= k <= len(src):
        raise GraphError(
            f"knn edges {src.name}->{dst.name}: k={k} must be between 1 and the number of "
            f"source nodes ({len(src)})"
        )
    return _nearest(src, dst.latlon, k, step, dst.xyz)


def _nearest(src: NodeSet, dst_latlon: np.ndarray, k: int, step=None, dst_xyz=None):
    """:func:`nearest` for destinations given by their ``[Q, 2]`` latitude/longitude (and unit
    vectors ``dst_xyz``, computed from them when not given)."""
    src_xyz = src.xyz
    dst_xyz = latlon_to_xyz(dst_latlon) if dst_xyz is None else dst_xyz
    device = search.search_device()
    size = _chunk_size()
    idx = np.empty((len(dst_latlon), k), np.int64)
    d2 = np.empty((len(dst_latlon), k), np.float64)
    if device is not None:
        index = search.SphereIndex.build(src.latlon, device, xyz=src_xyz)
        for lo, hi in _chunks(len(dst_latlon), size):
            i, d = search.knn(index, dst_latlon[lo:hi], k, dst_xyz[lo:hi])
            idx[lo:hi], d2[lo:hi] = i.cpu().numpy(), d.cpu().numpy()
            if step is not None:
                step()
        return idx, d2
    from scipy.spatial import cKDTree  # host path only: GPU machines may have no scipy

    tree = cKDTree(src_xyz)
    for lo, hi in _chunks(len(dst_latlon), size):
        idx[lo:hi], d2[lo:hi] = _tree_nearest(tree, src_xyz, dst_xyz[lo:hi], k)
        if step is not None:
            step()
    return idx, d2


def _tree_nearest(tree, src_xyz, dst_xyz, k):
    """k nearest by ``(d2, index)`` from a KD-tree: query ``k + 1``; where the ``k``-th and the
    last found are within rounding of each other (a tie the tree orders arbitrarily), query
    twice as many again until every source tied with the ``k``-th is among them."""
    n = len(src_xyz)
    idx = np.empty((len(dst_xyz), k), np.int64)
    d2 = np.empty((len(dst_xyz), k), np.float64)
    rows, m = np.arange(len(dst_xyz)), min(k + 1, n)
    while rows.size:
        near = tree.query(dst_xyz[rows], k=m, workers=_WORKERS)[1].reshape(len(rows), m)
        near = near.astype(np.int64)
        nd2 = search.squared_chords(src_xyz[near], dst_xyz[rows][:, None])
        order = np.lexsort((near, nd2), axis=1)
        near, nd2 = np.take_along_axis(near, order, 1), np.take_along_axis(nd2, order, 1)
        settled = (nd2[:, -1] * search.ACCEPT > nd2[:, k - 1]) | (m == n)
        idx[rows[settled]], d2[rows[settled]] = near[settled, :k], nd2[settled, :k]
        rows, m = rows[~settled], min(2 * m, n)
    return idx, d2


def nearest_neighbour_spacing(nodes: NodeSet) -> np.ndarray:
    """Chord distance from each node to its nearest other node, ``[N]``."""
    if len(nodes) < 2:
        raise GraphError(f"node set {nodes.name!r} has {len(nodes)} node; need at least 2")
    # the two nearest are the node itself and its nearest other (or a duplicate, both at 0)
    return np.sqrt(nearest(nodes, nodes, 2)[1].max(axis=1))


def _within(src: NodeSet, dst: NodeSet, radius: float, max_neighbours: int | None):
    """``(d, s, d2)`` of every source with ``d2 <= radius**2`` of each destination, sorted by
    destination then source; with ``max_neighbours`` only the nearest by ``(d2, index)``."""
    device = search.search_device()
    src_xyz, dst_xyz = src.xyz, dst.xyz
    if device is not None:
        index = search.SphereIndex.build(src.latlon, device, xyz=src_xyz)
        d, s, d2 = search.radius(index, dst.latlon, radius, max_neighbours, dst_xyz)
        return d.cpu().numpy(), s.cpu().numpy(), d2.cpu().numpy()
    # One search: in blocks of destinations each block walks the whole source tree again
    # (o1280_l8 encoder pair search on 2 cores: 10 s in one, 39 s in blocks of 65,536). The tree
    # radius is widened by rounding so that the exact test below decides every pair.
    from scipy.spatial import cKDTree

    pairs = cKDTree(dst_xyz).sparse_distance_matrix(
        cKDTree(src_xyz), radius * (1 + 1e-9) + 1e-12, output_type="ndarray"
    )
    d, s = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    d2 = search.squared_chords(src_xyz[s], dst_xyz[d])
    keep = d2 <= radius * radius
    d, s, d2 = d[keep], s[keep], d2[keep]
    if max_neighbours is not None:
        order = np.lexsort((s, d2, d))
        d, s, d2 = d[order], s[order], d2[order]
        starts = np.searchsorted(d, d, side="left")
        keep = (np.arange(len(d)) - starts) < max_neighbours
        d, s, d2 = d[keep], s[keep], d2[keep]
    order = np.argsort(d * len(src) + s, kind="stable")
    return d[order], s[order], d2[order]


def cutoff_edges(
    src: NodeSet,
    dst: NodeSet,
    factor: float,
    max_neighbours: int | None = None,
    min_neighbours: int | None = None,
    step: Callable[[], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every source within ``radius`` of each destination.

    ``radius = factor * max_i nn_spacing(dst)_i``: the largest nearest-neighbour spacing of the
    destination set (the mesh, for an encoder), as in Anemoi's cutoff edges. With
    ``max_neighbours``, each destination keeps only its nearest ``max_neighbours`` sources. With
    ``min_neighbours``, a destination that the radius gives fewer sources is joined to its nearest
    ``min_neighbours`` instead; without it, a destination left with no source is an error.
    ``step`` is called once the search is done (progress).
    """
    if not factor > 0:
        raise GraphError(f"cutoff edges {src.name}->{dst.name}: factor must be > 0, got {factor}")
    if max_neighbours is not None and max_neighbours < 1:
        raise GraphError(f"cutoff edges: max_neighbours must be >= 1, got {max_neighbours}")
    if min_neighbours is not None and not 1 <= min_neighbours <= len(src):
        raise GraphError(f"cutoff edges: min_neighbours must be in [1, {len(src)}]")
    radius = factor * float(nearest_neighbour_spacing(dst).max())
    # Capping at max(max, min) neighbours still tells which destinations fall short of min.
    cap = max_neighbours
    if cap is not None and min_neighbours is not None:
        cap = max(cap, int(min_neighbours))
    d, s, d2 = _within(src, dst, radius, cap)
    if step is not None:
        step()
    if min_neighbours is not None:
        d, s, d2 = _top_up(src, dst, d, s, d2, int(min_neighbours))
    reached = np.bincount(d, minlength=len(dst)) > 0
    if not reached.all():
        missing = int((~reached).sum())
        need = _factor_reaching_all(src, dst) / (radius / factor)
        raise GraphError(
            f"cutoff edges {src.name}->{dst.name}: radius {radius:.4g} (factor {factor}) leaves "
            f"{missing} of {len(dst)} destination nodes without edges; use a factor of at least "
            f"{np.ceil(need * 1000) / 1000:.3f}, or min_neighbours: 1 to join them to their nearest "
            "source, or knn edges"
        )
    if max_neighbours is not None and cap != max_neighbours:
        order = np.lexsort((s, d2, d))
        d, s = d[order], s[order]
        keep = (np.arange(len(d)) - np.searchsorted(d, d, side="left")) < max_neighbours
        d, s = d[keep], s[keep]
        order = np.argsort(d * len(src) + s, kind="stable")
        d, s = d[order], s[order]
    return s, d


def _top_up(src, dst, d, s, d2, min_neighbours):
    """Replace the edges of destinations with fewer than ``min_neighbours`` by their k nearest."""
    short = np.flatnonzero(np.bincount(d, minlength=len(dst)) < min_neighbours)
    if short.size == 0:
        return d, s, d2
    near, near_d2 = _nearest(src, dst.latlon[short], min_neighbours)
    keep = ~np.isin(d, short)
    d = np.concatenate([d[keep], np.repeat(short, min_neighbours)])
    s = np.concatenate([s[keep], near.ravel()])
    d2 = np.concatenate([d2[keep], near_d2.ravel()])
    order = np.argsort(d * len(src) + s, kind="stable")
    return d[order], s[order], d2[order]


def _factor_reaching_all(src: NodeSet, dst: NodeSet) -> float:
    """Smallest radius (chord) giving every destination at least one source."""
    return float(np.sqrt(nearest(src, dst, 1)[1].max()))


def knn_edges(
    src: NodeSet, dst: NodeSet, k: int, step: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest sources of every destination: exactly ``k * len(dst)`` edges.

    ``step`` is called after each block of destinations searched (progress).
    """
    idx = np.sort(nearest(src, dst, k, step)[0], axis=1)
    return idx.ravel(), np.repeat(np.arange(len(dst), dtype=np.int64), k)


def multiscale_edges(nodes: NodeSet, max_level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Union of every refinement level's triangle edges, in both directions.

    For a global level-L mesh this is ``sum_l 60 * 4**l = 60 * (4**(L+1) - 1) / 3`` directed edges
    (levels never share a node pair: refinement splits each edge at its midpoint). For a subset of a
    mesh (limited area, stretched), a level's edge is kept when both its ends are in the set.
    """
    if nodes.mesh_levels is None:
        raise GraphError(f"multi-scale edges need an icosahedral node set; {nodes.name!r} is not")
    level = int(nodes.meta.get("finest_level", nodes.mesh_levels.max()))
    level = level if max_level is None else min(level, max_level)
    full_xyz, all_faces = icosahedral_levels(level)
    local = _index_in_full_mesh(nodes, full_xyz)
    pairs = np.concatenate([face_edges(faces) for faces in all_faces])
    a, b = local[pairs[:, 0]], local[pairs[:, 1]]
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    return np.concatenate([a, b]), np.concatenate([b, a])


def _index_in_full_mesh(nodes: NodeSet, full_xyz: np.ndarray) -> np.ndarray:
    """For every node of the full mesh, its index in ``nodes`` or -1 when absent."""
    if len(nodes) == len(full_xyz):
        return np.arange(len(full_xyz), dtype=np.int64)
    idx, d2 = _nearest(nodes, xyz_to_latlon(full_xyz), 1)
    # a node of the set is its own mesh node up to rounding (1e-9 chord: ~6 mm on the Earth)
    return np.where(d2[:, 0] < 1e-18, idx[:, 0], -1).astype(np.int64)


EDGE_BUILDERS = {"cutoff", "knn", "multiscale"}


def resolved_spec(spec: dict) -> dict:
    """An edge spec with the defaults that change its edges filled in (the cutoff cap), so that a
    spec that leaves them out and one that writes them hash alike."""
    if spec.get("type") == "cutoff" and "max_neighbours" not in spec:
        return {**spec, "max_neighbours": DEFAULT_MAX_NEIGHBOURS}
    return dict(spec)


def build_edges(
    spec: dict, src: NodeSet, dst: NodeSet, step: Callable[[], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Build edges from a spec such as ``{"type": "knn", "k": 3}``; ``step`` is called
    :func:`search_steps` times (progress). A cutoff spec without ``max_neighbours`` is capped at
    :data:`DEFAULT_MAX_NEIGHBOURS` (see :func:`resolved_spec`)."""
    kind = spec.get("type")
    if kind == "cutoff":
        cap = spec.get("max_neighbours", DEFAULT_MAX_NEIGHBOURS)
        return cutoff_edges(src, dst, float(spec["factor"]), None if cap is None else int(cap),
                            spec.get("min_neighbours"), step)  # fmt: skip
    if kind == "knn":
        return knn_edges(src, dst, int(spec["k"]), step)
    if kind == "multiscale":
        if src is not dst:
            raise GraphError("multi-scale edges connect a mesh to itself; use src == dst")
        pairs = multiscale_edges(dst, spec.get("max_level"))
        if step is not None:
            step()
        return pairs
    raise GraphError(f"unknown edge type {kind!r}; choose one of {sorted(EDGE_BUILDERS)}")
