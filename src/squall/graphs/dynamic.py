"""Observation-to-mesh graphs built for every batch, on the device the model runs on.

A batch of ``B`` samples holds a different set of observations in each sample, packed into one
array (:class:`squall.data.observations.ObsBatch`): the observations of sample ``b`` are rows
``offsets[b]:offsets[b + 1]``. The graph of the batch is one bipartite edge set:

* sources: the ``N = offsets[B]`` packed observations;
* destinations: ``B * M`` rows, sample-major, where ``M`` mesh nodes are the queries: row
  ``b * M + m`` is mesh node ``m`` (the ``m``-th query row, see ``mesh_latlon``) of sample ``b``;
* edges: observation ``offsets[b] + j`` -> row ``b * M + m`` for every observation ``j`` of
  sample ``b`` within chord ``radius`` of mesh node ``m`` (at most ``max_neighbours`` per mesh
  node, the nearest by ``(d2, observation index)``), in CSC order: by destination row, then
  source. Edges of sample ``b`` are ``edge_offsets[b]:edge_offsets[b + 1]``; no edge joins two
  samples.

Each sample is one :func:`squall.graphs.search.radius` query of the mesh nodes against a
:class:`~squall.graphs.search.SphereIndex` of that sample's observations (latitude bands sorted
by longitude; built per sample on the device). A mesh node's edges depend on that node and the
observations alone, so a rank of a model-parallel group that passes only the mesh nodes it owns
gets exactly the rows of the whole graph's edges that end at them.

Edge attributes are those of the static graphs (:data:`squall.graphs.attributes.
EDGE_ATTRIBUTES`): great-circle length, here divided by the cutoff angle (the longest possible
edge, so the scale is the same in every batch where a static set divides by its own longest
edge), and the unit direction from the mesh node towards the observation in the mesh node's
east/north tangent frame (``(0, 0)`` for an observation on the node).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from squall.errors import GraphError
from squall.graphs.attributes import _tangent_frame_torch
from squall.graphs.search import SphereIndex, radius, spatial_order
from squall.kernels.edge_index import EdgeIndex


@dataclass(frozen=True)
class ObsGraph:
    """The observation-to-mesh edges of one batch (numbering in the module docstring).

    Attributes
    ----------
    index : EdgeIndex
        ``N`` packed observations -> ``B * M`` sample-major mesh rows, CSC order.
    attrs : torch.Tensor
        ``[E, 3]`` float32 length / cutoff angle, direction east, direction north.
    edge_offsets : torch.Tensor
        ``[B + 1]`` int64: the edges of sample ``b`` are ``edge_offsets[b]:edge_offsets[b + 1]``.
    num_samples, num_mesh : int
        ``B`` and ``M``.
    """

    index: EdgeIndex
    attrs: torch.Tensor
    edge_offsets: torch.Tensor
    num_samples: int
    num_mesh: int

    @property
    def num_edges(self) -> int:
        return self.index.num_edges


def mesh_frames(mesh_xyz: torch.Tensor) -> torch.Tensor:
    """``[M, 3, 3]`` float64 rows ``(xyz, east, north)`` of each mesh node (the destination frame of
    :func:`squall.graphs.attributes.edge_attributes`; east = x at the poles)."""
    east, north = _tangent_frame_torch(mesh_xyz)
    return torch.stack([mesh_xyz, east, north], 1)


def observation_edges(obs_latlon: torch.Tensor, offsets: torch.Tensor, mesh_latlon: torch.Tensor,
                      mesh_frame: torch.Tensor, chord: float, max_neighbours: int | None = None,
                      offsets_host: list[int] | None = None) -> ObsGraph:  # fmt: skip
    """The :class:`ObsGraph` of a packed batch of observations, on the mesh tensors' device.

    Parameters
    ----------
    obs_latlon : torch.Tensor
        ``[N, 2]`` float64 latitude, longitude (radians; longitudes in ``[0, 2 pi)``) of the packed
        observations.
    offsets : torch.Tensor
        ``[B + 1]`` int64 packing offsets (``offsets[0] = 0``, non-decreasing, ``offsets[B] = N``).
    mesh_latlon : torch.Tensor
        ``[M, 2]`` float64 mesh nodes (the queries; on a model-parallel rank its own nodes, in its
        row order).
    mesh_frame : torch.Tensor
        ``[M, 3, 3]`` float64 :func:`mesh_frames` of the same nodes.
    chord : float
        Cutoff chord length (unit sphere).
    max_neighbours : int, optional
        Observations kept per mesh node and sample (nearest first, ties by index).
    offsets_host : list of int, optional
        ``offsets`` already on the host (saves a device sync).
    """
    device = mesh_latlon.device
    if obs_latlon.ndim != 2 or obs_latlon.shape[1] != 2:
        raise GraphError(f"observation edges: need [N, 2] observation lat/lon, got "
                         f"{tuple(obs_latlon.shape)}")  # fmt: skip
    host = [int(v) for v in (offsets.tolist() if offsets_host is None else offsets_host)]
    if (len(host) < 2 or host[0] != 0 or host[-1] != len(obs_latlon)
            or any(b < a for a, b in zip(host, host[1:], strict=False))):  # fmt: skip
        raise GraphError(f"observation edges: offsets {host[:8]}{'...' if len(host) > 8 else ''} "
                         f"must rise from 0 to the {len(obs_latlon)} observations")  # fmt: skip
    if not 0 < chord <= 2:
        raise GraphError(f"observation edges: cutoff chord must lie in (0, 2], got {chord}")
    samples, m = len(host) - 1, len(mesh_latlon)
    obs_latlon = obs_latlon.to(device=device, dtype=torch.float64)
    mesh_xyz = mesh_frame[:, 0]
    # the search kernels' order of the mesh nodes (CUDA only: the CPU path has no kernels)
    order = _mesh_order(mesh_latlon) if device.type == "cuda" else None
    dst, src, d2 = [], [], []
    edge_offsets = [0]
    for b in range(samples):
        lo, hi = host[b], host[b + 1]
        if hi == lo:
            edge_offsets.append(edge_offsets[-1])
            continue
        index = SphereIndex.build(obs_latlon[lo:hi], device, rows=False)  # scattered points
        q, s, dist2 = radius(index, mesh_latlon, chord, max_neighbours, query_xyz=mesh_xyz,
                             query_order=order)  # fmt: skip
        dst.append(q + b * m if b else q)
        src.append(s + lo if lo else s)
        d2.append(dist2)
        edge_offsets.append(edge_offsets[-1] + len(q))
    dst, src, d2 = (_joined(parts, dtype, device) for parts, dtype in
                    ((dst, torch.int64), (src, torch.int64), (d2, torch.float64)))  # fmt: skip
    # dst ascends (sample-major, then mesh node): the CSC pointer is a binary search
    colptr = torch.searchsorted(dst, torch.arange(samples * m + 1, device=device))
    # non_blocking: a plain host-to-device copy would wait for the whole stream
    edge_offsets = torch.tensor(edge_offsets, dtype=torch.int64).to(device, non_blocking=True)
    attrs = _attributes(obs_latlon, src, dst % max(m, 1), d2, mesh_frame, chord)
    index = EdgeIndex.from_csc(colptr, src, len(obs_latlon))
    return ObsGraph(index, attrs, edge_offsets, samples, m)


def _joined(parts: list, dtype, device) -> torch.Tensor:
    """The tensors ``parts`` end to end (without a copy for one)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


#: The kernels' query order of recent mesh tensors: id -> (weak reference, version, order).
_ORDERS: dict = {}


def _mesh_order(mesh_latlon: torch.Tensor) -> torch.Tensor:
    """:func:`squall.graphs.search.spatial_order` of the mesh nodes, computed once per mesh
    tensor (the queries of every sample and batch) while it is alive and unchanged in place."""
    key = id(mesh_latlon)
    hit = _ORDERS.get(key)
    if hit is not None and hit[0]() is mesh_latlon and hit[1] == mesh_latlon._version:
        return hit[2]
    lat = mesh_latlon[:, 0].to(torch.float64)
    lon = mesh_latlon[:, 1].to(torch.float64)
    order = spatial_order(lat, lon)
    if len(_ORDERS) >= 8:
        _ORDERS.clear()
    _ORDERS[key] = (weakref.ref(mesh_latlon), mesh_latlon._version, order)
    return order


def _attributes(obs_latlon, src, mesh_row, d2, mesh_frame, chord) -> torch.Tensor:
    """``[E, 3]`` float32 edge attributes (module docstring), computed in float64."""
    if not len(src):
        return torch.zeros((0, 3), dtype=torch.float32, device=mesh_frame.device)
    lat, lon = obs_latlon[src, 0], obs_latlon[src, 1]
    cos_lat = torch.cos(lat)
    a = torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)], 1)
    frame = mesh_frame[mesh_row]
    b, east, north = frame[:, 0], frame[:, 1], frame[:, 2]
    length = 2 * torch.arcsin(torch.clamp(d2.sqrt() / 2, max=1.0))
    cut = 2 * math.asin(min(chord / 2, 1.0))
    tangent = a - (a * b).sum(1, keepdim=True).clamp(-1.0, 1.0) * b
    norm = torch.linalg.vector_norm(tangent, dim=1)
    scale = torch.where(norm > 1e-12, 1.0 / norm.clamp(min=1e-300), 0.0)
    out = torch.stack([length / cut, (tangent * east).sum(1) * scale,
                       (tangent * north).sum(1) * scale], 1)  # fmt: skip
    return out.to(torch.float32)


def brute_force_edges(obs_latlon: torch.Tensor, offsets, mesh_latlon: torch.Tensor,
                      mesh_xyz: torch.Tensor, chord: float,
                      max_neighbours: int | None = None):  # fmt: skip
    """Reference: ``(dst, src)`` int64 of :func:`observation_edges` by testing every pair in the
    same float64 order (``O(N M)``; tests only)."""
    dst, src = [], []
    m = len(mesh_latlon)
    host = [int(v) for v in torch.as_tensor(offsets).tolist()]
    for b in range(len(host) - 1):
        lo, hi = host[b], host[b + 1]
        if hi == lo:
            continue
        lat, lon = obs_latlon[lo:hi, 0], obs_latlon[lo:hi, 1]
        cos_lat = torch.cos(lat)
        oxyz = torch.stack([cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)])
        d2 = None
        for axis in range(3):
            d = oxyz[axis][None, :] - mesh_xyz[:, axis][:, None]
            d2 = d * d if d2 is None else d2 + d * d
        q, j = torch.nonzero(d2 <= chord * chord, as_tuple=True)  # by mesh node, then obs
        if max_neighbours is not None:
            # rank within each mesh node by (d2, index): stable sorts by d2, then by node
            order = torch.sort(d2[q, j], stable=True).indices
            order = order[torch.sort(q[order], stable=True).indices]
            start = torch.searchsorted(q[order], q[order])
            rank = torch.arange(len(order)) - start
            keep = torch.sort(order[rank < max_neighbours]).values
            q, j = q[keep], j[keep]
        dst.append(q + b * m)
        src.append(j + lo)
    if not dst:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.cat(dst), torch.cat(src)
