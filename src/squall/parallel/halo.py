"""Halo plans: what one rank owns, receives and sends for one edge set. Pure numpy, built once.

Numbering on rank ``r`` for an edge set ``src -> dst`` under a :class:`Partition`:

* **local destinations** ``j = 0 .. n_dst - 1`` are ``owned_dst[j]``, the destination nodes owned
  by ``r``, in ascending global order unless an ``order`` is given (the model numbers its mesh
  nodes with the processor's interior destinations first: :func:`interior_first_order`);
* **local sources** ``s = 0 .. n_own + n_halo - 1`` are ``[owned_src; halo_src]``: first the
  source nodes ``r`` owns, in their local order, then the halo, grouped by owning rank ascending and ascending
  global id inside a group. That is exactly the order in which ``all_to_all_single`` delivers the
  rows, so ``torch.cat([x_owned, x_received])`` is the local source tensor without any shuffle. For
  the processor (``src == dst``, one partition), local source ``s < n_own`` and local destination
  ``s`` are the same node;
* **local edges** are the edges ending at owned destinations, in global CSC order (``edge_ids``
  are their global CSC ids): each destination keeps its neighbour list and its order, so per
  destination aggregation is the same arithmetic as on one device;
* **send lists**: ``send_index`` holds local (owned) source ids, grouped by receiving rank
  ascending (``send_counts`` per rank), in each receiver's halo order (ascending global id).

:class:`SubGraph` is a subset of the local destinations with the sources and edges they need,
relabelled: the plan's ``full`` subgraph (all destinations), ``interior`` (destinations whose
sources are all owned: computable before the halo arrives) and ``boundary`` (the rest), and
:func:`chunk_subgraphs` for sequential processing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from squall.graphs.graph import EdgeSet
from squall.parallel.partition import Partition, sfc_keys


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every pair, int64."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + offsets


@dataclass(frozen=True, eq=False)
class SubGraph:
    """A subset of one rank's local destinations and everything needed to update them.

    Attributes
    ----------
    dst : numpy.ndarray
        ``[n_d]`` local destination ids, ascending.
    src : numpy.ndarray
        ``[n_s]`` local source ids this subset reads. With ``square`` the first ``n_d`` entries are
        ``dst`` itself (processor: the destinations' own rows give their queries), then the other
        sources ascending; otherwise the sources ascending.
    edges : numpy.ndarray
        ``[e]`` local edge ids, in local (CSC) order.
    colptr, row : numpy.ndarray
        CSC of the subset: ``colptr [n_d + 1]``, ``row [e]`` positions into ``src``.
    square : bool
        Whether ``src`` starts with ``dst`` (see above).
    """

    dst: np.ndarray
    src: np.ndarray
    edges: np.ndarray
    colptr: np.ndarray
    row: np.ndarray
    square: bool

    @property
    def num_dst(self) -> int:
        return len(self.dst)


def subgraph(
    colptr: np.ndarray,
    row: np.ndarray,
    dst: np.ndarray,
    num_src: int,
    square: bool,
    src: np.ndarray | None = None,
) -> SubGraph:
    """Cut the destinations ``dst`` (local ids, ascending) out of a local CSC.

    Parameters
    ----------
    colptr, row : numpy.ndarray
        Local CSC (``row`` are local source ids in ``[0, num_src)``).
    dst : numpy.ndarray
        Local destination ids to keep, ascending.
    num_src : int
        Number of local sources.
    square : bool
        Put ``dst`` first in the subset's sources (processor; see :class:`SubGraph`).
    src : numpy.ndarray, optional
        The subset's sources, when given (a superset of those its edges read, starting with
        ``dst`` when ``square``): e.g. all owned rows, so that no gather is needed.
    """
    dst = np.asarray(dst, dtype=np.int64)
    counts = colptr[dst + 1] - colptr[dst]
    edges = _ranges(colptr[dst], counts)
    rows = row[edges]
    if src is not None:
        src = np.asarray(src, dtype=np.int64)
        if square and not np.array_equal(src[: len(dst)], dst):
            raise ValueError("a square subset's sources must start with its destinations")
    elif square:
        src = np.concatenate([dst, np.setdiff1d(np.unique(rows), dst)])
    else:
        src = np.unique(rows)
    lookup = np.full(num_src, -1, dtype=np.int64)
    lookup[src] = np.arange(len(src))
    if (lookup[rows] < 0).any():
        raise ValueError("the given sources miss some the subset's edges read")
    sub_colptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return SubGraph(dst, src.astype(np.int64), edges, sub_colptr, lookup[rows], square)


@dataclass(frozen=True, eq=False)
class HaloPlan:
    """Rank ``rank``'s share of edge set ``name`` (numbering in the module docstring).

    Attributes
    ----------
    name : str
        Edge set (``"encoder"``, ``"processor"``, ``"decoder"``).
    rank, num_parts : int
        This rank's part and the model-parallel degree ``P``.
    owned_dst, owned_src, halo_src : numpy.ndarray
        Global ids of owned destinations, owned sources and halo sources (in receive order).
    recv_counts, send_counts : numpy.ndarray
        ``[P]`` rows received from / sent to each rank (0 for ``rank`` itself).
    send_index : numpy.ndarray
        ``[send_counts.sum()]`` local ids (``< n_own``) of the owned rows sent, per receiver.
    edge_ids : numpy.ndarray
        ``[E_local]`` global CSC ids of the local edges.
    colptr, row : numpy.ndarray
        Local CSC: ``[n_dst + 1]`` and ``[E_local]`` local source ids.
    group_exchanges : bool
        Whether any rank of the group sends anything for this edge set (every rank must then join
        the collective, even one with nothing to send or receive).
    full, interior, boundary : SubGraph
        All local destinations; those whose sources are all owned; the others.
    """

    name: str
    rank: int
    num_parts: int
    owned_dst: np.ndarray
    owned_src: np.ndarray
    halo_src: np.ndarray
    recv_counts: np.ndarray
    send_counts: np.ndarray
    send_index: np.ndarray
    edge_ids: np.ndarray
    colptr: np.ndarray
    row: np.ndarray
    group_exchanges: bool
    full: SubGraph
    interior: SubGraph
    boundary: SubGraph

    @property
    def num_owned_src(self) -> int:
        return len(self.owned_src)

    @property
    def num_local_src(self) -> int:
        return len(self.owned_src) + len(self.halo_src)

    @property
    def peers(self) -> tuple[int, ...]:
        """Ranks this rank receives from or sends to."""
        return tuple(int(p) for p in np.flatnonzero((self.recv_counts + self.send_counts) > 0))


def build_halo_plans(
    edges: EdgeSet, partition: Partition, order: Mapping[str, list[np.ndarray]] | None = None
) -> list[HaloPlan]:
    """Plans of every rank for one edge set (each rank keeps its own; all are needed to know
    who sends what).

    Parameters
    ----------
    edges : EdgeSet
        Edge set in CSC order.
    partition : Partition
        Owner of every node of ``edges.src`` and ``edges.dst``.
    order : mapping, optional
        Node set -> per part, the owned global ids in local order (a permutation of
        ``partition.owned(set, part)``); default ascending. Sets not named stay ascending.

    Returns
    -------
    list of HaloPlan
        One per part, index = rank in the model-parallel group.
    """
    p = partition.num_parts
    src_owner = partition.owner[edges.src]
    dst_owner = partition.owner[edges.dst]
    square = edges.src == edges.dst
    deg = np.diff(edges.colptr)
    pieces = []
    order = order or {}

    def owned(name, owner, r):
        ids = order[name][r] if name in order else np.flatnonzero(owner == r)
        if name in order and not np.array_equal(np.sort(ids), np.flatnonzero(owner == r)):
            raise ValueError(f"order of {name!r} for part {r} is not a permutation of its nodes")
        return np.asarray(ids, dtype=np.int64)

    for r in range(p):
        owned_dst = owned(edges.dst, dst_owner, r)
        owned_src = owned(edges.src, src_owner, r)
        counts = deg[owned_dst]
        edge_ids = _ranges(edges.colptr[owned_dst], counts)
        rows = edges.row[edge_ids]
        remote = src_owner[rows] != r
        halo = np.unique(rows[remote])
        halo = halo[np.argsort(src_owner[halo], kind="stable")]  # by owner, ascending id inside
        recv_counts = np.bincount(src_owner[halo], minlength=p).astype(np.int64)
        lookup = np.full(edges.num_src, -1, dtype=np.int64)
        lookup[owned_src] = np.arange(len(owned_src))
        lookup[halo] = len(owned_src) + np.arange(len(halo))
        colptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pieces.append((owned_dst, owned_src, halo, recv_counts, edge_ids, colptr, lookup[rows]))
    group_exchanges = any(len(piece[2]) for piece in pieces)
    plans = []
    for r in range(p):
        owned_dst, owned_src, halo, recv_counts, edge_ids, colptr, row = pieces[r]
        # what r sends to q: q's halo rows owned by r, in q's receive order (ascending id)
        sends = []
        position = np.full(edges.num_src, -1, dtype=np.int64)
        position[owned_src] = np.arange(len(owned_src))
        for q in range(p):
            halo_q = pieces[q][2]
            mine = halo_q[src_owner[halo_q] == r] if q != r else halo_q[:0]
            sends.append(position[mine])
        send_counts = np.array([len(s) for s in sends], dtype=np.int64)
        n_own, n_local = len(owned_src), len(owned_src) + len(halo)
        has_halo = np.zeros(len(owned_dst), dtype=bool)
        if len(row):
            dst_of_edge = np.repeat(np.arange(len(owned_dst)), np.diff(colptr))
            has_halo[dst_of_edge[row >= n_own]] = True
        full = subgraph(colptr, row, np.arange(len(owned_dst)), n_local, square)
        inner = np.flatnonzero(~has_halo)
        if square and np.array_equal(inner, np.arange(len(inner))):
            # interior destinations numbered first: they read the owned rows as they are
            interior = subgraph(colptr, row, inner, n_local, square, src=np.arange(n_own))
        else:
            interior = subgraph(colptr, row, inner, n_local, square)
        boundary = subgraph(colptr, row, np.flatnonzero(has_halo), n_local, square)
        plans.append(HaloPlan(
            edges.name, r, p, owned_dst, owned_src, halo, recv_counts, send_counts,
            np.concatenate(sends).astype(np.int64), edge_ids, colptr, row, group_exchanges,
            full, interior, boundary,
        ))  # fmt: skip
    return plans


def interior_first_order(plans: list[HaloPlan]) -> list[np.ndarray]:
    """Per part, the owned destinations of a square edge set with the interior ones first (each
    group ascending): with that local order the interior subset is a prefix of the owned rows and
    reads them without a gather, and interior and boundary outputs concatenate in order."""
    return [np.concatenate([p.owned_dst[p.interior.dst], p.owned_dst[p.boundary.dst]])
            for p in plans]  # fmt: skip


def chunk_subgraphs(plan: HaloPlan, dst_xyz: np.ndarray, chunks: int) -> list[SubGraph]:
    """Split a rank's destinations into ``chunks`` pieces for sequential processing.

    Destinations are ordered along the partitioner's Hilbert curve and cut into pieces with equal
    edge counts, so each piece reads a compact patch of sources.

    Parameters
    ----------
    plan : HaloPlan
        The rank's plan (its ``full`` subgraph is split).
    dst_xyz : numpy.ndarray
        ``[N_dst_global, 3]`` unit vectors of the destination node set.
    chunks : int
        Number of pieces ``K`` (at most the number of local destinations).

    Returns
    -------
    list of SubGraph
        ``K`` subgraphs whose ``dst`` lists partition ``range(n_dst)``.
    """
    n = len(plan.owned_dst)
    if not 1 <= chunks <= n:
        raise ValueError(f"cannot cut {n} destinations of {plan.name!r} into {chunks} chunks")
    order = np.argsort(sfc_keys(dst_xyz[plan.owned_dst]), kind="stable")
    weight = np.diff(plan.colptr).astype(np.float64) + 1.0  # edges, plus the node's own update
    cum = np.cumsum(weight[order])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, chunks) / chunks, side="left") + 1
    prev = 0
    for k in range(1, chunks):
        cuts[k - 1] = min(max(cuts[k - 1], prev + 1), n - chunks + k)
        prev = cuts[k - 1]
    pieces = np.split(order, cuts)
    square = plan.full.square
    return [subgraph(plan.colptr, plan.row, np.sort(d), plan.num_local_src, square)
            for d in pieces]  # fmt: skip
