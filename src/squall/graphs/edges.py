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
import torch

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
    return _host(*_nearest_nodes(src, dst, k, step))


def _nearest_nodes(src: NodeSet, dst: NodeSet, k: int, step=None, keep: bool = False):
    """:func:`nearest`; with ``keep``, tensors on the search device when the search runs in torch."""
    if not 1 <= k <= len(src):
        raise GraphError(
            f"knn edges {src.name}->{dst.name}: k={k} must be between 1 and the number of "
            f"source nodes ({len(src)})"
        )
    device = search.search_device()
    if device is not None:
        dst_latlon, dst_xyz = dst.on_device(device)
        return _nearest(src, dst_latlon, k, step, dst_xyz, keep)
    return _nearest(src, dst.latlon, k, step, dst_xyz=dst.xyz)


def _host(*arrays):
    """numpy arrays of tensors (numpy arrays pass through)."""
    return tuple(a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in arrays)


def _nearest(src: NodeSet, dst_latlon, k: int, step=None, dst_xyz=None, keep: bool = False):
    """:func:`nearest` for destinations given by their ``[Q, 2]`` latitude/longitude (and unit
    vectors ``dst_xyz``, computed from them when not given), numpy arrays or tensors on the
    search device. Results are numpy arrays, or with ``keep`` tensors on the search device when
    the search runs in torch."""
    device = search.search_device()
    size = _chunk_size()
    q = len(dst_latlon)
    if device is not None:
        if not isinstance(dst_latlon, torch.Tensor):
            dst_xyz = latlon_to_xyz(dst_latlon) if dst_xyz is None else dst_xyz
            dst_latlon, dst_xyz = (torch.from_numpy(np.ascontiguousarray(a)).to(device)
                                   for a in (dst_latlon, dst_xyz))  # fmt: skip
        src_latlon, src_xyz = src.on_device(device)
        index = search.SphereIndex.build(src_latlon, device, xyz=src_xyz)
        idx = torch.empty((q, k), dtype=torch.int64, device=device)
        d2 = torch.empty((q, k), dtype=torch.float64, device=device)
        for lo, hi in _chunks(q, size):
            idx[lo:hi], d2[lo:hi] = search.knn(index, dst_latlon[lo:hi], k, dst_xyz[lo:hi])
            if step is not None:
                step()
        return (idx, d2) if keep else _host(idx, d2)
    cKDTree = _kdtree()  # noqa: N806 (scipy's class)
    src_xyz = src.xyz
    dst_xyz = latlon_to_xyz(dst_latlon) if dst_xyz is None else dst_xyz
    idx = np.empty((q, k), np.int64)
    d2 = np.empty((q, k), np.float64)
    tree = cKDTree(src_xyz)
    for lo, hi in _chunks(q, size):
        idx[lo:hi], d2[lo:hi] = _tree_nearest(tree, src_xyz, dst_xyz[lo:hi], k)
        if step is not None:
            step()
    return idx, d2


def _kdtree():
    """scipy's ``cKDTree`` for the host search path (GPU machines may have no scipy)."""
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        raise GraphError(
            "the scipy search path (SQUALL_GRAPH_SEARCH=scipy, the default without a GPU) needs "
            "scipy: install it, or set SQUALL_GRAPH_SEARCH=cpu for the torch search"
        ) from None
    return cKDTree


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
    return _host(_spacing(nodes))[0]


def _spacing(nodes: NodeSet, keep: bool = False):
    """:func:`nearest_neighbour_spacing`, with ``keep`` a tensor on a torch search's device."""
    if len(nodes) < 2:
        raise GraphError(f"node set {nodes.name!r} has {len(nodes)} node; need at least 2")
    # the two nearest are the node itself and its nearest other (or a duplicate, both at 0)
    d2 = _nearest_nodes(nodes, nodes, 2, keep=keep)[1]
    return d2.amax(1).sqrt() if isinstance(d2, torch.Tensor) else np.sqrt(d2.max(axis=1))


def _within(src: NodeSet, dst: NodeSet, radius: float, max_neighbours: int | None,
            keep: bool = False):  # fmt: skip
    """``(d, s, d2)`` of every source with ``d2 <= radius**2`` of each destination, sorted by
    destination then source; with ``max_neighbours`` only the nearest by ``(d2, index)``.
    numpy arrays, or with ``keep`` tensors on the device of a torch search."""
    device = search.search_device()
    if device is not None:
        src_latlon, src_xyz = src.on_device(device)
        index = search.SphereIndex.build(src_latlon, device, xyz=src_xyz)
        dst_latlon, dst_xyz = dst.on_device(device)
        d, s, d2 = search.radius(index, dst_latlon, radius, max_neighbours, dst_xyz)
        return (d, s, d2) if keep else _host(d, s, d2)
    src_xyz, dst_xyz = src.xyz, dst.xyz
    # One search: in blocks of destinations each block walks the whole source tree again
    # (o1280_l8 encoder pair search on 2 cores: 10 s in one, 39 s in blocks of 65,536). The tree
    # radius is widened by rounding so that the exact test below decides every pair.
    cKDTree = _kdtree()  # noqa: N806 (scipy's class)
    pairs = cKDTree(dst_xyz).sparse_distance_matrix(
        cKDTree(src_xyz), radius * (1 + 1e-9) + 1e-12, output_type="ndarray"
    )
    d, s = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    d2 = search.squared_chords(src_xyz[s], dst_xyz[d])
    keep_pair = d2 <= radius * radius
    d, s, d2 = d[keep_pair], s[keep_pair], d2[keep_pair]
    if max_neighbours is not None:
        order = np.lexsort((s, d2, d))
        d, s, d2 = d[order], s[order], d2[order]
        starts = np.searchsorted(d, d, side="left")
        keep_pair = (np.arange(len(d)) - starts) < max_neighbours
        d, s, d2 = d[keep_pair], s[keep_pair], d2[keep_pair]
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
    return _host(*_cutoff_pairs(src, dst, factor, max_neighbours, min_neighbours, step))


def _cutoff_pairs(src, dst, factor, max_neighbours=None, min_neighbours=None, step=None,
                  keep: bool = False):  # fmt: skip
    """:func:`cutoff_edges`; with ``keep``, tensors on the device of a torch search (the common
    case, no ``min_neighbours`` top-up or second cap, never leaves it)."""
    if not factor > 0:
        raise GraphError(f"cutoff edges {src.name}->{dst.name}: factor must be > 0, got {factor}")
    if max_neighbours is not None and max_neighbours < 1:
        raise GraphError(f"cutoff edges: max_neighbours must be >= 1, got {max_neighbours}")
    if min_neighbours is not None and not 1 <= min_neighbours <= len(src):
        raise GraphError(f"cutoff edges: min_neighbours must be in [1, {len(src)}]")
    # sqrt is monotone and correctly rounded: the largest spacing has the same bits on any path
    radius = factor * float(_spacing(dst, keep=True).max())
    # Capping at max(max, min) neighbours still tells which destinations fall short of min.
    cap = max_neighbours
    if cap is not None and min_neighbours is not None:
        cap = max(cap, int(min_neighbours))
    d, s, d2 = _within(src, dst, radius, cap, keep=keep)
    if step is not None:
        step()
    if min_neighbours is not None or cap != max_neighbours:
        d, s, d2 = _host(d, s, d2)
    if min_neighbours is not None:
        d, s, d2 = _top_up(src, dst, d, s, d2, int(min_neighbours))
    _check_reached(src, dst, d, radius, factor)
    if max_neighbours is not None and cap != max_neighbours:
        order = np.lexsort((s, d2, d))
        d, s = d[order], s[order]
        keep_pair = (np.arange(len(d)) - np.searchsorted(d, d, side="left")) < max_neighbours
        d, s = d[keep_pair], s[keep_pair]
        order = np.argsort(d * len(src) + s, kind="stable")
        d, s = d[order], s[order]
    return s, d


def _check_reached(src, dst, d, radius, factor) -> None:
    """A clear error when a destination of a cutoff edge set has no source."""
    if isinstance(d, torch.Tensor):
        missing = int((torch.bincount(d, minlength=len(dst)) == 0).sum())
    else:
        missing = int((np.bincount(d, minlength=len(dst)) == 0).sum())
    if missing:
        need = _factor_reaching_all(src, dst) / (radius / factor)
        raise GraphError(
            f"cutoff edges {src.name}->{dst.name}: radius {radius:.4g} (factor {factor}) leaves "
            f"{missing} of {len(dst)} destination nodes without edges; use a factor of at least "
            f"{np.ceil(need * 1000) / 1000:.3f}, or min_neighbours: 1 to join them to their nearest "
            "source, or knn edges"
        )


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
    return _host(*_knn_pairs(src, dst, k, step))


def _knn_pairs(src, dst, k, step=None, keep: bool = False):
    """:func:`knn_edges`; with ``keep``, tensors on the device of a torch search."""
    idx = _nearest_nodes(src, dst, k, step, keep)[0]
    if isinstance(idx, torch.Tensor):
        rows = torch.arange(len(dst), dtype=torch.int64, device=idx.device)
        return torch.sort(idx, dim=1).values.ravel(), rows.repeat_interleave(k)
    return np.sort(idx, axis=1).ravel(), np.repeat(np.arange(len(dst), dtype=np.int64), k)


def multiscale_edges(nodes: NodeSet, max_level: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Union of every refinement level's triangle edges, in both directions.

    For a global level-L mesh this is ``sum_l 60 * 4**l = 60 * (4**(L+1) - 1) / 3`` directed edges
    (levels never share a node pair: refinement splits each edge at its midpoint). For a subset of a
    mesh (limited area, stretched), a level's edge is kept when both its ends are in the set.
    """
    return _multiscale_pairs(nodes, _multiscale_level(nodes, max_level))


def _multiscale_level(nodes: NodeSet, max_level: int | None) -> int:
    """The finest refinement level of ``nodes`` (at most ``max_level``)."""
    if nodes.mesh_levels is None:
        raise GraphError(f"multi-scale edges need an icosahedral node set; {nodes.name!r} is not")
    level = int(nodes.meta.get("finest_level", nodes.mesh_levels.max()))
    return level if max_level is None else min(level, max_level)


def _multiscale_pairs(nodes: NodeSet, level: int, device: torch.device | None = None):
    """:func:`multiscale_edges` up to ``level``; on a ``device``, the integer work (unique
    edges of each level's triangles) runs there and the pairs stay there as tensors."""
    full_xyz, all_faces = icosahedral_levels(level)
    local = _index_in_full_mesh(nodes, full_xyz)
    if device is None:
        pairs = np.concatenate([face_edges(faces) for faces in all_faces])
        a, b = local[pairs[:, 0]], local[pairs[:, 1]]
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        return np.concatenate([a, b]), np.concatenate([b, a])
    pairs = torch.cat([_face_edges_tensor(torch.from_numpy(f).to(device)) for f in all_faces])
    local = torch.from_numpy(local).to(device)
    a, b = local[pairs[:, 0]], local[pairs[:, 1]]
    keep = (a >= 0) & (b >= 0)
    a, b = a[keep], b[keep]
    return torch.cat([a, b]), torch.cat([b, a])


def _face_edges_tensor(faces: torch.Tensor) -> torch.Tensor:
    """:func:`squall.graphs.grids.face_edges` of an int64 tensor: the same unique sorted pairs
    (the same integer keys ``lo * n + hi``, sorted and made unique)."""
    pairs = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    lo, hi = pairs.amin(1), pairs.amax(1)
    n = int(hi.max()) + 1
    keys = torch.unique(lo * n + hi, sorted=True)
    return torch.stack([keys // n, keys % n], 1)


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
    spec: dict,
    src: NodeSet,
    dst: NodeSet,
    step: Callable[[], None] | None = None,
    keep_on_device: bool = False,
):
    """Build edges from a spec such as ``{"type": "knn", "k": 3}``; ``step`` is called
    :func:`search_steps` times (progress). A cutoff spec without ``max_neighbours`` is capped at
    :data:`DEFAULT_MAX_NEIGHBOURS` (see :func:`resolved_spec`).

    Returns ``(src, dst)`` int64 numpy arrays; with ``keep_on_device``, searched edges stay
    tensors on the device of a torch search (the graph builder sorts them there).
    """
    kind = spec.get("type")
    if kind == "cutoff":
        cap = spec.get("max_neighbours", DEFAULT_MAX_NEIGHBOURS)
        return _cutoff_pairs(src, dst, float(spec["factor"]), None if cap is None else int(cap),
                             spec.get("min_neighbours"), step, keep_on_device)  # fmt: skip
    if kind == "knn":
        return _knn_pairs(src, dst, int(spec["k"]), step, keep_on_device)
    if kind == "multiscale":
        if src is not dst:
            raise GraphError("multi-scale edges connect a mesh to itself; use src == dst")
        device = search.search_device()
        on = device if keep_on_device and device is not None else None
        pairs = _multiscale_pairs(dst, _multiscale_level(dst, spec.get("max_level")), on)
        if step is not None:
            step()
        return pairs
    raise GraphError(f"unknown edge type {kind!r}; choose one of {sorted(EDGE_BUILDERS)}")
