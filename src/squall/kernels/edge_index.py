"""Per-graph edge index for attention kernels, built once per graph and reused every call.

Index conventions: edges are numbered in CSC order (grouped by destination, ascending). ``colptr
[N_dst + 1]`` delimits each destination's edges, ``row [E]`` is each edge's source and ``dst [E]``
its destination. The reverse (CSR) view used by backward passes groups the same edges by source:
``rowptr [N_src + 1]`` delimits each source's edges in ``csr_perm [E]``, which holds CSC edge ids.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
        """Copy every tensor field to ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return type(self)(**moved)
