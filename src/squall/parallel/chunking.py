"""Update a subset of a block's destinations: the unit of sharding, overlap and chunking.

A :class:`~squall.parallel.halo.SubGraph` (destinations, the sources they read, their edges) is
turned into device tensors once (:class:`DeviceSubGraph`); :func:`subgraph_block` then runs one
GraphTransformer block for those destinations only: the block's own forward on the gathered
sources, destinations and edges, so every destination sees the same rows, edges and CSC order as
on one device and its result is the same arithmetic.

Sequential processing (``chunks = K``) runs a mapper as ``K`` such subsets one after another, each
under ``torch.utils.checkpoint``: the forward keeps only each chunk's output, and the backward
recomputes one chunk at a time, so the mapper's peak activation memory falls roughly as ``1/K``.

"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from squall.kernels.edge_index import EdgeIndex
from squall.parallel.halo import SubGraph


def _index_or_none(ids: np.ndarray, n: int, device) -> torch.Tensor | None:
    """``None`` when ``ids`` is ``arange(n)`` (no gather needed), else the ids as a tensor."""
    if len(ids) == n and np.array_equal(ids, np.arange(n)):
        return None
    return torch.from_numpy(np.ascontiguousarray(ids)).to(device)


class DeviceSubGraph:
    """A :class:`SubGraph` as device tensors; ``None`` gathers stand for "all rows, in order".

    Parameters
    ----------
    sub : SubGraph
    num_dst, num_src, num_edges : int
        Local destinations, local sources (owned + halo) and local edges of the rank.
    device : torch.device or str
    """

    def __init__(self, sub: SubGraph, num_dst: int, num_src: int, num_edges: int, device="cpu",
                 num_owned_src: int | None = None):  # fmt: skip
        self.sub, self.shape = sub, (num_dst, num_src, num_edges)
        self.num_owned_src = num_owned_src
        self.num_dst, self.square = sub.num_dst, sub.square
        self.dst = _index_or_none(sub.dst, num_dst, device)
        self.src = _index_or_none(sub.src, num_src, device)
        self.own_src = self.halo_src = None
        if num_owned_src is not None:
            # the subset's owned sources come first, its halo sources (ids >= n_own) last, both
            # ascending (square: the destinations, then the rest ascending): two gathers, one cat
            k = int((sub.src < num_owned_src).sum())
            if (sub.src[:k] >= num_owned_src).any() or (sub.src[k:] < num_owned_src).any():
                raise ValueError("a subset's sources must list its owned rows before its halo")
            self.own_src = _index_or_none(sub.src[:k], num_owned_src, device)
            self.halo_src = _index_or_none(sub.src[k:] - num_owned_src, num_src - num_owned_src,
                                           device)  # fmt: skip
        self.edges = _index_or_none(sub.edges, num_edges, device)
        self.index = None
        if sub.num_dst:
            self.index = EdgeIndex.from_csc(
                torch.from_numpy(sub.colptr), torch.from_numpy(sub.row), len(sub.src)
            ).to(device)

    def to(self, device) -> DeviceSubGraph:
        return DeviceSubGraph(self.sub, *self.shape, device, self.num_owned_src)

    def sources(self, x_src: torch.Tensor, halo: torch.Tensor | None) -> torch.Tensor:
        """The subset's source rows ``[B, n_s, C]`` from the owned rows ``x_src`` and, when
        given, the received ``halo`` rows (local sources ``[x_src; halo]``, never concatenated
        whole: see :func:`subgraph_block`)."""
        if halo is None:
            return x_src if self.src is None else x_src.index_select(1, self.src)
        if self.num_owned_src is None:
            raise ValueError("halo rows given to a subset built without num_owned_src")
        own = x_src if self.own_src is None else x_src.index_select(1, self.own_src)
        far = halo if self.halo_src is None else halo.index_select(1, self.halo_src)
        return torch.cat([own, far], 1)


def subgraph_block(block, sub: DeviceSubGraph, x_src, x_dst, edge_attr, halo=None) -> torch.Tensor:
    """New features ``[B, n_d, C]`` of the destinations of ``sub`` after ``block``.

    Parameters
    ----------
    block : GraphTransformerBlock
    sub : DeviceSubGraph
        Must have at least one destination.
    x_src : torch.Tensor
        ``[B, N_src, C]`` local sources (owned, then halo; with ``halo`` the owned rows only);
        ``sub.src`` indexes ``[x_src; halo]``. For a square (processor) subset the first ``n_d``
        gathered rows are the destinations themselves.
    x_dst : torch.Tensor
        ``[B, N_dst, C]`` local destinations (bipartite blocks only; ignored when square).
    edge_attr : torch.Tensor
        ``[E_local, d_e]`` local edge features.
    halo : torch.Tensor, optional
        ``[B, n_halo, C]`` received halo rows. Passed apart from the owned rows so that the
        sources are assembled inside a checkpointed region: a block recomputed in backward then
        keeps the owned rows (alive anyway: the previous block's output, the decoder's
        destinations) and the small halo, not a second, concatenated copy of its sources.
    """
    xs = sub.sources(x_src, halo)
    ea = edge_attr if sub.edges is None else edge_attr.index_select(0, sub.edges)
    if sub.square:
        xd = xs[:, : sub.num_dst]
    else:
        xd = x_dst if sub.dst is None else x_dst.index_select(1, sub.dst)
    return block(xs, xd, ea, sub.index)


def run_subgraph(block, sub: DeviceSubGraph, x_src, x_dst, edge_attr, recompute: bool,
                 halo=None):  # fmt: skip
    """:func:`subgraph_block`, under activation checkpointing when ``recompute`` (and grads are
    on); an empty subset gives ``[B, 0, C]``."""
    if sub.num_dst == 0:
        return x_dst.new_zeros((x_dst.shape[0], 0, x_dst.shape[2]))
    fn = partial(subgraph_block, block, sub)
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, x_src, x_dst, edge_attr, halo, use_reentrant=False)
    return fn(x_src, x_dst, edge_attr, halo)


def run_chunks(block, chunks, perm, x_src, x_dst, edge_attr, halo=None) -> torch.Tensor:
    """Run ``chunks`` one after another, each recomputed in backward; result in local
    destination order (``perm`` from :func:`merge_order`).

    Each chunk gathers its destination rows inside its checkpointed region, so nothing of
    destination size is kept besides the outputs. (Gathering all destinations once in chunk order
    and splitting them, tried on H100, kept that copy alive through the backward: at least 0.8 GiB more
    peak for the o320_l7 decoder at 4 chunks.)
    """
    outs = [run_subgraph(block, c, x_src, x_dst, edge_attr, True, halo) for c in chunks]
    out = torch.cat(outs, 1)
    outs.clear()  # the pieces die here, not after the reordering copy below
    return out.index_select(1, perm)


def merge_order(subs: list[SubGraph], num_dst: int) -> np.ndarray:
    """``perm`` such that ``cat(outputs of subs)[:, perm]`` is in local destination order.

    Raises
    ------
    ValueError
        If the subsets' destinations do not partition ``range(num_dst)``.
    """
    cat = np.concatenate([s.dst for s in subs]) if subs else np.zeros(0, dtype=np.int64)
    if len(cat) != num_dst or not np.array_equal(np.sort(cat), np.arange(num_dst)):
        raise ValueError(f"subsets cover {len(cat)} destinations, not a partition of {num_dst}")
    perm = np.empty(num_dst, dtype=np.int64)
    perm[cat] = np.arange(num_dst)
    return perm


def merge(outputs: list[torch.Tensor], perm: torch.Tensor | None) -> torch.Tensor:
    """Concatenate per-subset outputs ``[B, n_i, C]`` and put rows back in destination order
    (``perm`` ``None``: they already are)."""
    out = torch.cat(outputs, 1)
    return out if perm is None else out.index_select(1, perm)
