"""Node and edge attributes fed to the model's embeddings."""

from __future__ import annotations

import numpy as np
import torch

from squall.graphs.search import search_device

EDGE_ATTRIBUTES = ("length", "direction_east", "direction_north")
NODE_ATTRIBUTES = ("sin_lat", "cos_lat", "sin_lon", "cos_lon")


def node_attributes(latlon: np.ndarray) -> np.ndarray:
    """``[N, 4]`` float32: sin/cos of latitude and longitude."""
    lat, lon = latlon[:, 0], latlon[:, 1]
    return np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)], 1).astype(np.float32)


def edge_attributes(
    src_xyz: np.ndarray,
    dst_xyz: np.ndarray,
    src: np.ndarray | None = None,
    dst: np.ndarray | None = None,
    chunk: int = 1 << 22,
) -> np.ndarray:
    """``[E, 3]`` float32 attributes of edges ``src -> dst``.

    Columns: great-circle length divided by the longest edge of the set (in ``[0, 1]``), and the unit
    direction from the destination towards the source in the destination's local tangent frame
    (east, north components; ``(0, 0)`` for a zero-length edge, and east = x at the poles).

    With ``src``/``dst`` index arrays, ``src_xyz``/``dst_xyz`` are the node sets' unit vectors and
    the tangent frames are computed once per destination node; without them, they are per-edge
    endpoint vectors. Edges are processed ``chunk`` at a time (4 M edges: ~0.5 GB of float64
    temporaries), so 35 M-edge graphs (o1280_l8) stay within a few GB. When the graph search runs
    on a GPU (:func:`squall.graphs.search.search_device`), so does this
    (:func:`edge_attributes_torch`).
    """
    if src is None:
        src, dst = np.arange(len(src_xyz)), np.arange(len(dst_xyz))
    device = search_device()
    if device is not None and device.type == "cuda":
        return edge_attributes_torch(src_xyz, dst_xyz, src, dst, device)
    east_nodes, north_nodes = tangent_frame(dst_xyz)
    out = np.empty((len(src), 3), dtype=np.float32)
    for lo in range(0, len(src), chunk):
        s_i, d_i = src[lo : lo + chunk], dst[lo : lo + chunk]
        a, b = src_xyz[s_i], dst_xyz[d_i]
        cos_angle = np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0)
        # 2 asin(chord / 2) keeps short edges accurate where arccos(cos) would not
        out[lo : lo + chunk, 0] = 2 * np.arcsin(np.minimum(np.linalg.norm(a - b, axis=1) / 2, 1.0))
        tangent = a - cos_angle[:, None] * b  # component of src orthogonal to dst
        norm = np.linalg.norm(tangent, axis=1)
        scale = np.where(norm > 1e-12, 1.0 / np.maximum(norm, 1e-300), 0.0)
        out[lo : lo + chunk, 1] = np.einsum("ij,ij->i", tangent, east_nodes[d_i]) * scale
        out[lo : lo + chunk, 2] = np.einsum("ij,ij->i", tangent, north_nodes[d_i]) * scale
    longest = out[:, 0].max() if len(out) else 0.0
    if longest > 0:
        out[:, 0] /= longest
    return out


def tangent_frame(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit east and north vectors at each point; at the poles east is the x axis."""
    east = np.stack([-xyz[:, 1], xyz[:, 0], np.zeros(len(xyz))], 1)
    norm = np.linalg.norm(east, axis=1, keepdims=True)
    polar = norm[:, 0] < 1e-12
    east = np.where(polar[:, None], np.array([[1.0, 0.0, 0.0]]), east / np.maximum(norm, 1e-300))
    north = np.cross(xyz, east)
    return east, north


def edge_attributes_torch(
    src_xyz,
    dst_xyz,
    src,
    dst,
    device,
    chunk: int = 1 << 24,
) -> np.ndarray:
    """:func:`edge_attributes` on ``device`` in float64, the same formulas in the same order
    (results equal the numpy ones to float32 rounding: the libraries' arcsin and norm may differ
    in the last float64 bit). Inputs are numpy arrays or tensors; ``chunk`` edges at a time:
    16 M edges take ~2 GB of temporaries."""
    return edge_attributes_tensor(src_xyz, dst_xyz, src, dst, device, chunk).cpu().numpy()


def _on(array, device, dtype) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def edge_attributes_tensor(src_xyz, dst_xyz, src, dst, device, chunk: int = 1 << 24):
    """:func:`edge_attributes_torch` left on ``device``: ``[E, 3]`` float32 tensor (the graph
    builder's path, whose edges and unit vectors are already there)."""
    src_t, dst_t = _on(src_xyz, device, torch.float64), _on(dst_xyz, device, torch.float64)
    src, dst = _on(src, device, torch.int64), _on(dst, device, torch.int64)
    east_nodes, north_nodes = _tangent_frame_torch(dst_t)
    out = torch.empty((len(src), 3), dtype=torch.float32, device=device)
    for lo in range(0, len(src), chunk):
        s_i, d_i = src[lo : lo + chunk], dst[lo : lo + chunk]
        a, b = src_t[s_i], dst_t[d_i]
        cos_angle = (a * b).sum(1).clamp(-1.0, 1.0)
        chord = torch.linalg.vector_norm(a - b, dim=1)
        out[lo : lo + chunk, 0] = 2 * torch.arcsin(torch.clamp(chord / 2, max=1.0))
        tangent = a - cos_angle[:, None] * b
        norm = torch.linalg.vector_norm(tangent, dim=1)
        scale = torch.where(norm > 1e-12, 1.0 / norm.clamp(min=1e-300), 0.0)
        out[lo : lo + chunk, 1] = (tangent * east_nodes[d_i]).sum(1) * scale
        out[lo : lo + chunk, 2] = (tangent * north_nodes[d_i]).sum(1) * scale
    if len(out):
        longest = out[:, 0].max()
        # divide only by a positive length, without a host round trip
        out[:, 0] /= torch.where(longest > 0, longest, torch.ones_like(longest))
    return out


def _tangent_frame_torch(xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tangent_frame` of a ``[N, 3]`` float64 tensor."""
    east = torch.stack([-xyz[:, 1], xyz[:, 0], torch.zeros_like(xyz[:, 0])], 1)
    norm = torch.linalg.vector_norm(east, dim=1, keepdim=True)
    polar = norm[:, 0] < 1e-12
    x_axis = torch.tensor([[1.0, 0.0, 0.0]], dtype=xyz.dtype, device=xyz.device)
    east = torch.where(polar[:, None], x_axis, east / norm.clamp(min=1e-300))
    return east, torch.linalg.cross(xyz, east, dim=1)
