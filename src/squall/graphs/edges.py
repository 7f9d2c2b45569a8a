"""Edge builders between node sets: cutoff radius, k nearest neighbours, multi-scale mesh edges.

Every builder returns ``(src, dst)`` int64 arrays of directed edges ``src -> dst``, in no particular
order; :class:`squall.graphs.graph.EdgeSet` sorts them into CSC order once. Distances between unit
vectors are chord lengths (``2 sin(angle / 2)``), monotone in great-circle distance.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial import cKDTree

from squall.errors import GraphError
from squall.graphs.grids import NodeSet, face_edges, icosahedral_levels

# scipy's KD-tree parallelises queries over all cores with workers=-1.
_WORKERS = -1
#: Destinations per step of a k-nearest search, so that big ones (the o1280 decoder: 6.6 M grid
#: points) show their progress: on 2 cores the o1280 decoder takes 101 steps of 0.18 s (median),
#: 25 s against 21 s in one search; graphs up to o96 search in one step.
SEARCH_CHUNK = 1 << 16


def search_steps(spec: dict, dst: NodeSet) -> int:
    """Progress steps of building the edge set ``spec`` into ``dst``: the blocks of a k-nearest
    search (:data:`SEARCH_CHUNK`), else one."""
    if spec.get("type") == "knn":
        return max(1, -(-len(dst) // SEARCH_CHUNK))
    return 1


def _chunks(n: int):
    """``(start, stop)`` of each block of :data:`SEARCH_CHUNK` destinations."""
    for lo in range(0, n, SEARCH_CHUNK):
        yield lo, min(lo + SEARCH_CHUNK, n)


def nearest_neighbour_spacing(nodes: NodeSet) -> np.ndarray:
    """Chord distance from each node to its nearest other node, ``[N]``."""
    if len(nodes) < 2:
        raise GraphError(f"node set {nodes.name!r} has {len(nodes)} node; need at least 2")
    xyz = nodes.xyz
    dist, _ = cKDTree(xyz).query(xyz, k=2, workers=_WORKERS)
    return dist[:, 1]


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
    radius = factor * float(nearest_neighbour_spacing(dst).max())
    # One search: in blocks of destinations each block walks the whole source tree again
    # (o1280_l8 encoder pair search on 2 cores: 10 s in one, 39 s in blocks of 65,536).
    pairs = cKDTree(dst.xyz).sparse_distance_matrix(cKDTree(src.xyz), radius, output_type="ndarray")
    d, s, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    if step is not None:
        step()
    if min_neighbours is not None:
        d, s, dist = _top_up(src, dst, d, s, dist, int(min_neighbours))
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
    if max_neighbours is not None:
        order = np.lexsort((dist, d))
        d, s, dist = d[order], s[order], dist[order]
        starts = np.searchsorted(d, d, side="left")
        keep = (np.arange(len(d)) - starts) < max_neighbours
        d, s = d[keep], s[keep]
    return s, d


def _top_up(src, dst, d, s, dist, min_neighbours):
    """Replace the edges of destinations with fewer than ``min_neighbours`` by their k nearest."""
    if not 1 <= min_neighbours <= len(src):
        raise GraphError(f"cutoff edges: min_neighbours must be in [1, {len(src)}]")
    short = np.flatnonzero(np.bincount(d, minlength=len(dst)) < min_neighbours)
    if short.size == 0:
        return d, s, dist
    near_dist, near = cKDTree(src.xyz).query(dst.xyz[short], k=min_neighbours, workers=_WORKERS)
    keep = ~np.isin(d, short)
    return (
        np.concatenate([d[keep], np.repeat(short, min_neighbours)]),
        np.concatenate([s[keep], near.reshape(-1).astype(np.int64)]),
        np.concatenate([dist[keep], near_dist.reshape(-1)]),
    )


def _factor_reaching_all(src: NodeSet, dst: NodeSet) -> float:
    """Smallest radius (chord) giving every destination at least one source."""
    dist, _ = cKDTree(src.xyz).query(dst.xyz, k=1, workers=_WORKERS)
    return float(dist.max())


def knn_edges(src: NodeSet, dst: NodeSet, k: int,
              step: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest sources of every destination: exactly ``k * len(dst)`` edges.

    ``step`` is called after each block of destinations searched (progress).
    """
    if k < 1 or k > len(src):
        raise GraphError(
            f"knn edges {src.name}->{dst.name}: k={k} must be between 1 and the number of "
            f"source nodes ({len(src)})"
        )
    tree, xyz, found = cKDTree(src.xyz), dst.xyz, []  # NodeSet.xyz is computed on each access
    for lo, hi in _chunks(len(dst)):
        found.append(tree.query(xyz[lo:hi], k=k, workers=_WORKERS)[1].reshape(hi - lo, k))
        if step is not None:
            step()
    idx = np.concatenate(found).astype(np.int64) if found else np.empty((0, k), np.int64)
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
    dist, idx = cKDTree(nodes.xyz).query(full_xyz, k=1, workers=_WORKERS)
    return np.where(dist < 1e-9, idx, -1).astype(np.int64)


EDGE_BUILDERS = {"cutoff", "knn", "multiscale"}


def build_edges(spec: dict, src: NodeSet, dst: NodeSet,
                step: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Build edges from a spec such as ``{"type": "knn", "k": 3}``; ``step`` is called
    :func:`search_steps` times (progress)."""
    kind = spec.get("type")
    if kind == "cutoff":
        return cutoff_edges(src, dst, float(spec["factor"]), spec.get("max_neighbours"),
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
