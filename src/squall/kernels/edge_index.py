"""Per-graph edge index for attention kernels, built once per graph and reused every call.

Index conventions: edges are numbered in CSC order (grouped by destination, ascending). ``colptr
[N_dst + 1]`` delimits each destination's edges, ``row [E]`` is each edge's source and ``dst [E]``
its destination. The reverse (CSR) view used by backward passes groups the same edges by source:
``rowptr [N_src + 1]`` delimits each source's edges in ``csr_perm [E]``, which holds CSC edge ids.

``kernel`` holds the same views as int32 plus the degree-class schedules the Triton kernels launch
from (see :class:`KernelIndex`); it is derived from the fields above when the index is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# Degree classes: a node of in-degree (or out-degree) d falls in the first class whose cap is >= d,
# or in the last, open class. Each class is launched with its own edge-block size and destinations
# per program (tuned per class in gt_attention/tuning.py). 4 holds the decoder's knn-3 nodes in
# one block, 8 the processor's refined-mesh nodes (5 to 7 edges), 16 the encoder's cutoff nodes
# (5 to 12).
DEGREE_CLASS_CAPS = (4, 8, 16)


def degree_schedule(ptr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Group nodes by degree class, keeping ascending node order inside a class.

    Parameters
    ----------
    ptr : torch.Tensor
        Compressed pointer ``[n + 1]`` (``colptr`` or ``rowptr``).

    Returns
    -------
    order : torch.Tensor
        ``[n]`` int32 node ids, class 0 first.
    counts : tuple of int
        Number of nodes in each class (``len(DEGREE_CLASS_CAPS) + 1`` entries).
    """
    deg = ptr[1:] - ptr[:-1]
    caps = torch.tensor(DEGREE_CLASS_CAPS, dtype=deg.dtype, device=deg.device)
    cls = torch.bucketize(deg, caps, right=False)
    order = torch.sort(cls, stable=True).indices.to(torch.int32)
    counts = torch.bincount(cls, minlength=len(DEGREE_CLASS_CAPS) + 1)
    return order, tuple(int(c) for c in counts.tolist())


@dataclass(frozen=True)
class KernelIndex:
    """int32 views and degree-class launch schedules for the Triton attention kernels.

    ``colptr``, ``row``, ``rowptr``, ``csr_perm`` mirror :class:`EdgeIndex` in int32; ``csr_dst
    [E]`` is the destination of each edge in CSR order (``dst[csr_perm]``). ``dst_sched`` /
    ``src_sched`` (``[3, n]`` int32) list destinations / sources grouped by degree class (row 0)
    with each one's first and one-past-last edge position (rows 1, 2: the pointer at the node and
    the node + 1), so a kernel reads a node's edge range without a dependent load; ``dst_counts`` /
    ``src_counts`` hold the nodes per class.
    """

    colptr: torch.Tensor
    row: torch.Tensor
    rowptr: torch.Tensor
    csr_perm: torch.Tensor
    csr_dst: torch.Tensor
    dst_sched: torch.Tensor
    dst_counts: tuple[int, ...]
    src_sched: torch.Tensor
    src_counts: tuple[int, ...]

    @classmethod
    def build(cls, colptr, row, dst, rowptr, csr_perm) -> KernelIndex:
        """Derive the int32 views and schedules (once per graph)."""
        if row.numel() >= 2**31 - 1:
            raise ValueError(f"{row.numel()} edges do not fit the kernels' int32 edge ids")
        i32 = torch.int32
        dst_order, dst_counts = degree_schedule(colptr)
        src_order, src_counts = degree_schedule(rowptr)

        def sched(order, ptr):
            o = order.long()
            return torch.stack([order, ptr[o].to(i32), ptr[o + 1].to(i32)])

        return cls(
            colptr.to(i32), row.to(i32), rowptr.to(i32), csr_perm.to(i32),
            dst.index_select(0, csr_perm).to(i32),
            sched(dst_order, colptr), dst_counts, sched(src_order, rowptr), src_counts,
        )  # fmt: skip

    def to(self, device: torch.device | str) -> KernelIndex:
        """Copy every tensor field to ``device``."""
        return type(self)(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})


def _moved(value, device):
    return value.to(device) if isinstance(value, (torch.Tensor, KernelIndex)) else value


@dataclass(frozen=True)
class EdgeIndex:
    """CSC and CSR views of one bipartite (or square) edge set, as device tensors."""

    num_src: int
    num_dst: int
    colptr: torch.Tensor
    row: torch.Tensor
    dst: torch.Tensor
    rowptr: torch.Tensor
    csr_perm: torch.Tensor
    kernel: KernelIndex | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kernel is None:
            kernel = KernelIndex.build(self.colptr, self.row, self.dst, self.rowptr, self.csr_perm)
            object.__setattr__(self, "kernel", kernel)

    @property
    def num_edges(self) -> int:
        return int(self.row.numel())

    @classmethod
    def from_csc(cls, colptr: torch.Tensor, row: torch.Tensor, num_src: int) -> EdgeIndex:
        """Build every view from a CSC pointer and source indices (no re-sorting of CSC order)."""
        colptr = torch.as_tensor(colptr, dtype=torch.int64)
        row = torch.as_tensor(row, dtype=torch.int64)
        num_dst = colptr.numel() - 1
        counts = colptr[1:] - colptr[:-1]
        dst = torch.repeat_interleave(torch.arange(num_dst, device=colptr.device), counts)
        csr_perm = torch.sort(row, stable=True).indices
        rowptr = torch.zeros(num_src + 1, dtype=torch.int64, device=row.device)
        rowptr[1:] = torch.cumsum(torch.bincount(row, minlength=num_src), 0)
        return cls(num_src, num_dst, colptr, row, dst, rowptr, csr_perm)

    def to(self, device: torch.device | str) -> EdgeIndex:
        """Copy every tensor field (and the kernel index) to ``device``."""
        return type(self)(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})
