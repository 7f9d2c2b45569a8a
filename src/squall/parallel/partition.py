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

``"work"``
    The ``"sfc"`` curve cut by counted work (:func:`balance_work`): every part's rows and edges of
    every edge set, its halo rows included, each weighed by its measured cost per step
    (:class:`WorkCosts`), instead of one summed node weight. o320_l7, 16 layers, counted work
    max / mean of ``"sfc"`` against ``"work"``: 1.0000 / 1.0000 at P = 2, 1.0022 / 1.0001 at
    P = 16; on one H200 both P = 2 shares of ``"sfc"`` take the same time (rank 1 / rank 0 0.998
    to 1.007), and counted work predicts the uneven ``"ranges"`` shares (1.337 counted, 1.305
    timed): profiling/results/parallel_balance.md. ``"sfc"`` stays the default.

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

from squall.config import PARTITION_METHODS as METHODS
from squall.graphs import Graph

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
    total = float(np.sum(weights))
    return split_at(order, weights, total * np.arange(1, parts) / parts)


def split_at(order: np.ndarray, weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Cut ``order`` into ``len(targets) + 1`` contiguous pieces at cumulative weights ``targets``.

    Cut ``k`` falls after the first node (in ``order``) whose cumulative weight reaches
    ``targets[k]``; cuts are then forced strictly increasing and inside ``[k + 1, N - P + k + 1]``
    so that every part keeps at least one node, whatever the weights. Returns the part of every
    node ``[N]`` int32 (part ``k`` holds the ``k``-th piece of ``order``).
    """
    n, parts = len(order), len(targets) + 1
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} nodes into {parts} parts")
    cum = np.cumsum(weights[order])
    cuts = np.searchsorted(cum, np.asarray(targets, dtype=np.float64), side="left") + 1
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
    graph: Graph,
    parts: int,
    method: str = "sfc",
    edge_weights: Mapping[str, float] | None = None,
    costs: WorkCosts | None = None,
) -> Partition:
    """Assign every node of every node set of ``graph`` to one of ``parts`` parts.

    Parameters
    ----------
    graph : Graph
        The model's graph.
    parts : int
        Number of parts ``P`` (``1 <= P <=`` the smallest node set).
    method : {"sfc", "ranges", "bands", "work"}
        See the module docstring.
    edge_weights : mapping of str to float, optional
        Weight of each edge set's edges in the balance (default 1 each), e.g. ``{"processor": L}``.
        With ``"work"`` and no ``costs``, ``edge_weights["processor"]`` is the number of processor
        layers of :func:`measured_costs`.
    costs : WorkCosts, optional
        ``"work"`` only: the cost of every counted row and edge (default :func:`measured_costs`).

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
    if method == "work":
        if costs is None:
            costs = measured_costs(graph, int((edge_weights or {}).get("processor", 1)))
        return balance_work(graph, parts, costs)
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
    order = _sfc_order(graph)
    joint = split_weighted(order, np.concatenate([weights[name] for name in names]), parts)
    return Partition(parts, method, _unjoin(graph, joint, parts))


def _sfc_order(graph: Graph) -> np.ndarray:
    """Every node of every node set (node sets concatenated in ``graph.nodes`` order) sorted along
    one Hilbert curve (:func:`sfc_keys`)."""
    keys = np.concatenate([sfc_keys(graph.nodes[name].xyz) for name in graph.nodes])
    return np.argsort(keys, kind="stable")


def _unjoin(graph: Graph, joint: np.ndarray, parts: int) -> dict[str, np.ndarray]:
    """Owner arrays per node set from one array over the concatenated node sets; every part must
    own nodes of every set."""
    sizes = {name: len(nodes) for name, nodes in graph.nodes.items()}
    start = np.cumsum([0] + list(sizes.values()))
    owner = {name: joint[start[i] : start[i + 1]] for i, name in enumerate(sizes)}
    empty = {name: int((np.bincount(o, minlength=parts) == 0).sum()) for name, o in owner.items()}
    if any(empty.values()):
        raise ValueError(
            f"sfc partition into {parts} parts leaves parts without nodes {empty} "
            f"(node set sizes {sizes}): use fewer parts"
        )
    return owner


# -- work-balanced partition -------------------------------------------------------------------


@dataclass(frozen=True)
class WorkCosts:
    """Cost per step of every row and edge a part computes (any one unit; seconds below).

    A part's work (:func:`part_work`) is, over every edge set ``e`` (source set ``s``,
    destination set ``d``) and node set ``n``::

        edge[e] * E_e + dst[e] * |owned d| + src[e] * (|owned s| + halo_e) + node[n] * |owned n|

    where ``E_e`` is the part's edges of ``e`` (those into its destinations) and ``halo_e`` the
    distinct sources of those edges owned by another part: the local source rows of the part's
    halo plan (owned first, halo after) are exactly ``|owned s| + halo_e``. Costs are per step,
    so an edge set run ``L`` times a step (the processor) carries ``L`` times its per-run cost.
    Missing keys cost 0.

    Attributes
    ----------
    edge, dst, src : mapping of str to float
        Edge set -> cost per edge, per destination row, per local source row.
    node : mapping of str to float
        Node set -> cost per owned node outside the blocks (embeddings, output head, loss).
    """

    edge: Mapping[str, float]
    dst: Mapping[str, float]
    src: Mapping[str, float]
    node: Mapping[str, float]


def _halo_counts(graph: Graph, partition: Partition, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs, recv_part)`` of edge set ``name``: the distinct ``receiving part * N_src +
    source`` of edges whose source another part owns, and each pair's receiving part."""
    e = graph.edges[name]
    dst_owner = partition.owner[e.dst][e.dst_index]
    remote = dst_owner != partition.owner[e.src][e.row]
    pairs = np.unique(dst_owner[remote].astype(np.int64) * e.num_src + e.row[remote])
    return pairs, pairs // e.num_src


def part_work(graph: Graph, partition: Partition, costs: WorkCosts) -> np.ndarray:
    """Counted work of every part ``[P]`` (the sum of :class:`WorkCosts`), pure arithmetic on the
    partition: no halo plan is built."""
    p = partition.num_parts
    work = np.zeros(p)
    for name in graph.nodes:
        work += float(costs.node.get(name, 0.0)) * partition.counts(name)
    for name, e in graph.edges.items():
        edges = np.bincount(partition.owner[e.dst][e.dst_index], minlength=p)
        _, recv = _halo_counts(graph, partition, name)
        src_rows = partition.counts(e.src) + np.bincount(recv, minlength=p)
        work += (float(costs.edge.get(name, 0.0)) * edges
                 + float(costs.dst.get(name, 0.0)) * partition.counts(e.dst)
                 + float(costs.src.get(name, 0.0)) * src_rows)  # fmt: skip
    return work


def work_weights(graph: Graph, name: str, costs: WorkCosts) -> np.ndarray:
    """Work ``[N]`` each node of set ``name`` brings to the part that owns it, halo excluded:
    its own cost, its destination row and in-edges in every edge set ending at ``name``, its
    owned source row in every edge set starting at ``name``. Summed over a part's nodes this is
    :func:`part_work` less the halo rows' ``src`` cost."""
    n = len(graph.nodes[name])
    w = np.full(n, float(costs.node.get(name, 0.0)))
    for key, e in graph.edges.items():
        if e.dst == name:
            w += float(costs.dst.get(key, 0.0))
            w += float(costs.edge.get(key, 0.0)) * e.in_degree()
        if e.src == name:
            w += float(costs.src.get(key, 0.0))
    return w


def balance_work(graph: Graph, parts: int, costs: WorkCosts, iterations: int = 8) -> Partition:
    """Cut the joint Hilbert curve of every node set (as ``"sfc"``) so that every part's
    :func:`part_work` is the same.

    Every node carries its :func:`work_weights`; the halo rows, the one term no node carries
    (it depends on where the cuts fall), are added per part: starting from equal weights, each
    iteration counts every part's halo work ``h_k`` of the current cuts and moves the cuts so
    that part ``k`` gets node weight ``mean - h_k``, where ``mean`` is the total work over ``P``.
    The halo moves little when a cut moves by a few nodes, so this settles in two or three
    iterations; it stops when the halo work no longer changes, or after ``iterations``.

    Returns a :class:`Partition` with ``method="work"``. Bound: each cut falls within one node of
    its target, so with the halo settled every part's work is within ``2 * max(work_weights)`` of
    the mean (the largest of the last iteration's halo changes is added when it has not settled).
    """
    names = list(graph.nodes)
    w = np.concatenate([work_weights(graph, name, costs) for name in names])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("work costs must be finite, non-negative and not all zero")
    order = _sfc_order(graph)
    total = float(w.sum())
    joint = split_weighted(order, w, parts)
    part = Partition(parts, "work", _unjoin(graph, joint, parts))
    used = np.zeros(parts)
    for _ in range(iterations):
        halo = part_work(graph, part, costs) - _node_work(w, joint, parts)
        if np.allclose(halo, used, rtol=0, atol=1e-12 * total):
            break
        desired = (total + halo.sum()) / parts - halo
        joint = split_at(order, w, np.cumsum(desired)[:-1])
        part, used = Partition(parts, "work", _unjoin(graph, joint, parts)), halo
    return part


# Measured costs of :func:`measured_costs`, one H200, bf16 autocast, 1024 channels, 16 heads,
# MLP ratio 4, every block compiled, flat fused triton attention, no recomputation. Per block:
# milliseconds of forward + backward of rank 0's share of o320_l7 at P = 2 without communication
# (profiling/results/parallel_fastpath.md, git 58172ae: traced compute between exchanges, the
# processor the median layer) with that share's edges, destination rows and local source rows.
_SHARE_MS = {
    "encoder": (20.733, 330_676, 81_922, 211_056),
    "processor": (15.706, 655_356, 81_922, 83_155),
    "decoder": (36.872, 631_680, 210_560, 82_500),  # the output head and the loss included
}
# Embeddings forward + backward (compute before the encoder's exchange and after its reverse
# one), same run: milliseconds over the share's grid points + mesh nodes.
_EMBED_MS_ROWS = (6.947, 210_560 + 81_922)
# The attention kernels alone, forward + backward, ns per edge on the whole o320_l7 edge sets
# (profiling/results/attention_vs_anemoi.md, H200, bf16, flat fused: 10.321 ms for 2,651,528
# encoder edges, 6.389 ms for 1,310,700 processor edges, 10.195 ms for 1,263,360 decoder edges).
_KERNEL_NS_PER_EDGE = {"encoder": 3.892, "processor": 4.874, "decoder": 8.070}
# Matrix-product FLOPs per row of a block (units of C^2): a destination row has q, the output
# projection and the MLP (2 x ratio 4), a source row k and v. The row time of a block (its time
# less its edges') is split between its destination and source rows in this proportion.
_DST_ROW_FLOPS, _SRC_ROW_FLOPS = 2 + 2 * 4, 2


def measured_costs(graph: Graph, processor_layers: int) -> WorkCosts:
    """:class:`WorkCosts` in milliseconds per step from the H200 measurements above.

    Edges cost what the attention kernels cost per edge; each block's remaining time is its rows'
    (destination and source rows in the proportion of their matrix products); embeddings cost per
    owned node; the processor's costs are per layer times ``processor_layers``. Measured at
    1024 channels: at other widths the proportions shift (matrix products grow as ``C^2``, edges
    as ``C``), which moves the balance, not the validity of the partition.
    """
    edge, dst, src = {}, {}, {}
    for role, (ms, n_edges, n_dst, n_src) in _SHARE_MS.items():
        uses = processor_layers if role == "processor" else 1
        per_edge = _KERNEL_NS_PER_EDGE[role] * 1e-6
        unit = (ms - per_edge * n_edges) / (_DST_ROW_FLOPS * n_dst + _SRC_ROW_FLOPS * n_src)
        edge[role] = uses * per_edge
        dst[role], src[role] = uses * _DST_ROW_FLOPS * unit, uses * _SRC_ROW_FLOPS * unit
    per_row = _EMBED_MS_ROWS[0] / _EMBED_MS_ROWS[1]
    node = {name: per_row for name in graph.nodes}
    return WorkCosts(edge, dst, src, node)


def _node_work(w: np.ndarray, joint: np.ndarray, parts: int) -> np.ndarray:
    return np.bincount(joint, weights=w, minlength=parts)


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
        edges[name] = np.bincount(partition.owner[e.dst][e.dst_index], minlength=p)
        # unique (receiving part, source node) pairs are the rows each part receives
        pairs, recv_part = _halo_counts(graph, partition, name)
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
