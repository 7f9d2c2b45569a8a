"""Which part (rank of a model-parallel group) owns which node of every node set. Pure numpy.

Ownership convention: a part owns a set of nodes of each node set and, for every edge set, all the
edges whose destination it owns. Sources it needs but does not own are its halo
(:mod:`squall.parallel.halo`).

Methods
-------
``"sfc"``
    Locality-aware: the nodes of *all* node sets are merged and sorted along one Hilbert curve on
    the six faces of a cube circumscribing the sphere (equi-angular face coordinates), and that one
    curve is cut into ``P`` contiguous pieces of equal total weight. A part's grid points and its
    mesh nodes therefore cover the same region, so the mapper halos stay a thin band (on o320_l7 at
    P = 4, cutting each set on its own curve independently left 4x more encoder halo rows).
``"ranges"``
    Baseline: each node set on its own, contiguous index ranges of equal weight (latitude bands on
    Gaussian grids, refinement order on icosahedral meshes).
``"bands"``
    Baseline: each node set on its own, sorted by latitude (north to south, then longitude) and
    cut into bands of equal weight: index ranges made fair to the mesh.

Aliases: ``"space_filling_curve"`` for ``"sfc"``, ``"index_ranges"`` for ``"ranges"``.

Weights: a node's weight is ``1 / N`` plus, for every edge set ending at its node set, its in-degree
divided by that edge set's edge count times the edge set's weight (``edge_weights``, default 1;
pass the number of processor layers for ``"processor"`` so that the edge set run ``L`` times per
step is balanced first). Parts are balanced in that weight; the report gives the resulting node and
edge imbalance separately (o320_l7, P = 16, processor weight 16: processor edges 1.019, data nodes
1.062).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from squall.graphs import Graph

METHODS = ("sfc", "ranges", "bands")
ALIASES = {"space_filling_curve": "sfc", "index_ranges": "ranges", "latitude_bands": "bands"}

# Hilbert curve order per cube face: 2**16 cells per side is ~0.1 km on Earth at the face centre,
# far below any grid spacing squall builds (O1280 is ~9 km), so no two nodes of a set that matter
# share a cell; 6 * 4**16 keys fit int64 with room to spare.
HILBERT_BITS = 16


def hilbert_index(x: np.ndarray, y: np.ndarray, bits: int) -> np.ndarray:
    """Distance along the Hilbert curve of the ``2**bits x 2**bits`` grid cells ``(x, y)``.

    Vectorised form of the classic iterative ``xy2d`` (rotate the quadrant, add its offset).
    """
    x, y = x.astype(np.int64).copy(), y.astype(np.int64).copy()
    n = np.int64(1) << bits
    d = np.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def sfc_keys(xyz: np.ndarray, bits: int = HILBERT_BITS) -> np.ndarray:
    """Position of unit vectors ``xyz [N, 3]`` along a Hilbert curve on the cube map of the sphere.

    Face ``f`` is the dominant axis and its sign, in the order +x, +y, +z, -x, -y, -z (each face
    borders the next, so the curve never jumps to the opposite side of the globe); face
    coordinates are equi-angular (``atan`` of the gnomonic ones), which makes cells nearly equal in
    area. Returns int64 keys ``f * 4**bits + hilbert(u, v)``.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    axis = np.abs(xyz).argmax(1)
    sign = xyz[np.arange(len(xyz)), axis] < 0
    face = axis + 3 * sign
    major = np.abs(xyz[np.arange(len(xyz)), axis])
    # the two other axes, in cyclic order, as face coordinates in [-1, 1]
    a = xyz[np.arange(len(xyz)), (axis + 1) % 3] / major
    b = xyz[np.arange(len(xyz)), (axis + 2) % 3] / major
    a, b = np.arctan(a) * (4 / np.pi), np.arctan(b) * (4 / np.pi)
    cells = (1 << bits) - 1
    u = np.clip(np.round((a + 1) / 2 * cells), 0, cells).astype(np.int64)
    v = np.clip(np.round((b + 1) / 2 * cells), 0, cells).astype(np.int64)
    return face.astype(np.int64) * (np.int64(1) << (2 * bits)) + hilbert_index(u, v, bits)


def node_weights(graph: Graph, name: str, edge_weights: Mapping[str, float] | None = None):
    """Balancing weight ``[N]`` of every node of set ``name`` (see the module docstring)."""
    edge_weights = edge_weights or {}
    n = len(graph.nodes[name])
    w = np.full(n, 1.0 / n)
    for key, e in graph.edges.items():
        if e.dst == name and e.num_edges:
            w += float(edge_weights.get(key, 1.0)) * e.in_degree() / e.num_edges
    return w


def split_weighted(order: np.ndarray, weights: np.ndarray, parts: int) -> np.ndarray:
    """Cut ``order`` (a permutation of node ids) into ``parts`` contiguous pieces of equal weight.

    Returns the part of every node ``[N]`` int32. Cut ``k`` falls after the first node whose
    cumulative weight reaches ``k / parts`` of the total, so every part is non-empty when
    ``parts <= N``.
    """
    n = len(order)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} nodes into {parts} parts")
    cum = np.cumsum(weights[order])
    targets = cum[-1] * np.arange(1, parts) / parts
    cuts = np.searchsorted(cum, targets, side="left") + 1
    # keep every part non-empty (cut k-1 in [k, n - P + k], strictly increasing) even for
    # wildly skewed weights
    prev = 0
    for k in range(1, parts):
        cuts[k - 1] = min(max(cuts[k - 1], prev + 1), n - parts + k)
        prev = cuts[k - 1]
    part_of_pos = np.zeros(n, dtype=np.int32)
    part_of_pos[cuts] += 1
    part_of_pos = np.cumsum(part_of_pos, dtype=np.int32)
    owner = np.empty(n, dtype=np.int32)
    owner[order] = part_of_pos
    return owner


@dataclass(frozen=True, eq=False)
class Partition:
    """Owner part of every node of every node set.

    Attributes
    ----------
    num_parts : int
        ``P``, the model-parallel degree (or number of chunks).
    method : str
        ``"sfc"`` or ``"ranges"``.
    owner : mapping of str to numpy.ndarray
        Node set name -> ``[N]`` int32 part of each node, in ``[0, P)``.
    """

    num_parts: int
    method: str
    owner: Mapping[str, np.ndarray]

    def owned(self, name: str, part: int) -> np.ndarray:
        """Global ids of the nodes of ``name`` owned by ``part``, ascending (their local order)."""
        return np.flatnonzero(self.owner[name] == part)

    def counts(self, name: str) -> np.ndarray:
        """Nodes of ``name`` owned by each part, ``[P]``."""
        return np.bincount(self.owner[name], minlength=self.num_parts)


def partition_graph(
    graph: Graph, parts: int, method: str = "sfc", edge_weights: Mapping[str, float] | None = None
) -> Partition:
    """Assign every node of every node set of ``graph`` to one of ``parts`` parts.

    Parameters
    ----------
    graph : Graph
        The model's graph.
    parts : int
        Number of parts ``P`` (``1 <= P <=`` the smallest node set).
    method : {"sfc", "ranges"}
        See the module docstring.
    edge_weights : mapping of str to float, optional
        Weight of each edge set's edges in the balance (default 1 each), e.g. ``{"processor": L}``.

    Returns
    -------
    Partition

    Raises
    ------
    ValueError
        On an unknown method, or more parts than nodes in some node set.
    """
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise ValueError(
            f"unknown partition method {method!r}; choose one of {METHODS} or {tuple(ALIASES)}"
        )
    names = list(graph.nodes)
    sizes = {name: len(graph.nodes[name]) for name in names}
    small = {name: n for name, n in sizes.items() if n < parts}
    if parts < 1 or small:
        raise ValueError(f"cannot split into {parts} parts: node set sizes {sizes}")
    weights = {name: node_weights(graph, name, edge_weights) for name in names}
    if method in ("ranges", "bands"):
        owner = {}
        for name in names:
            order = np.arange(sizes[name])
            if method == "bands":
                lat, lon = graph.nodes[name].latlon[:, 0], graph.nodes[name].latlon[:, 1]
                order = np.lexsort((lon, -lat))
            owner[name] = split_weighted(order, weights[name], parts)
        return Partition(parts, method, owner)
    keys = np.concatenate([sfc_keys(graph.nodes[name].xyz) for name in names])
    order = np.argsort(keys, kind="stable")
    joint = split_weighted(order, np.concatenate([weights[name] for name in names]), parts)
    start = np.cumsum([0] + [sizes[name] for name in names])
    owner = {name: joint[start[i] : start[i + 1]] for i, name in enumerate(names)}
    empty = {name: int((np.bincount(o, minlength=parts) == 0).sum()) for name, o in owner.items()}
    if any(empty.values()):
        raise ValueError(
            f"sfc partition into {parts} parts leaves parts without nodes {empty} "
            f"(node set sizes {sizes}): use fewer parts"
        )
    return Partition(parts, method, owner)


@dataclass(frozen=True)
class PartStats:
    """One part's share: per node set owned nodes; per edge set edges, halo rows and peers."""

    part: int
    nodes: dict[str, int]
    edges: dict[str, int]
    halo_rows: dict[str, int]
    peers: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class PartitionReport:
    """Balance and communication volume of a partition.

    Attributes
    ----------
    parts : tuple of PartStats
    edge_imbalance : dict
        Edge set -> ``max / mean`` edges per part (1.0 is perfect); ``"total"`` over all edge sets.
    node_imbalance : dict
        Node set -> ``max / mean`` nodes per part.
    halo_rows : dict
        Edge set -> halo rows summed over parts (rows received per exchange of that edge set);
        ``"total"`` sums the edge sets once each (a processor layer counted once).
    """

    method: str
    num_parts: int
    parts: tuple[PartStats, ...]
    edge_imbalance: dict[str, float]
    node_imbalance: dict[str, float]
    halo_rows: dict[str, int]

    def table(self) -> str:
        """Plain-text table, one row per part."""
        lines = [
            f"partition {self.method} P={self.num_parts}: edge imbalance "
            + ", ".join(f"{k} {v:.3f}" for k, v in self.edge_imbalance.items())
            + "; halo rows "
            + ", ".join(f"{k} {v}" for k, v in self.halo_rows.items())
        ]
        for s in self.parts:
            lines.append(
                f"  part {s.part}: nodes {s.nodes} edges {s.edges} halo {s.halo_rows} "
                f"peers { {k: len(v) for k, v in s.peers.items()} }"
            )
        return "\n".join(lines)


def _imbalance(counts: np.ndarray) -> float:
    mean = counts.mean()
    return float(counts.max() / mean) if mean > 0 else 1.0


def partition_report(graph: Graph, partition: Partition) -> PartitionReport:
    """Owned nodes, edges, halo rows and peers per part; imbalance and total halo volume."""
    p = partition.num_parts
    edges = {}
    halo = {}
    peers = {}
    for name, e in graph.edges.items():
        dst_owner = partition.owner[e.dst][e.dst_index]
        src_owner = partition.owner[e.src][e.row]
        edges[name] = np.bincount(dst_owner, minlength=p)
        remote = dst_owner != src_owner
        # unique (receiving part, source node) pairs are the rows each part receives
        pairs = np.unique(dst_owner[remote].astype(np.int64) * e.num_src + e.row[remote])
        recv_part = pairs // e.num_src
        halo[name] = np.bincount(recv_part, minlength=p)
        sender = partition.owner[e.src][pairs % e.num_src]
        links = np.unique(recv_part * p + sender)
        peers[name] = [tuple(int(x % p) for x in links[links // p == r]) for r in range(p)]
    stats = tuple(
        PartStats(
            r,
            {n: int(c[r]) for n, c in ((n, partition.counts(n)) for n in graph.nodes)},
            {k: int(v[r]) for k, v in edges.items()},
            {k: int(v[r]) for k, v in halo.items()},
            {k: v[r] for k, v in peers.items()},
        )
        for r in range(p)
    )
    edge_imb = {k: _imbalance(v) for k, v in edges.items()}
    edge_imb["total"] = _imbalance(sum(edges.values()))
    node_imb = {n: _imbalance(partition.counts(n)) for n in graph.nodes}
    halo_rows = {k: int(v.sum()) for k, v in halo.items()}
    halo_rows["total"] = sum(halo_rows.values())
    return PartitionReport(partition.method, p, stats, edge_imb, node_imb, halo_rows)
