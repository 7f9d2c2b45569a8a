"""Node and edge attributes fed to the model's embeddings."""

from __future__ import annotations

import numpy as np

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
    temporaries), so 35 M-edge graphs (o1280_l8) stay within a few GB.
    """
    if src is None:
        src, dst = np.arange(len(src_xyz)), np.arange(len(dst_xyz))
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
