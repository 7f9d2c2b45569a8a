"""Node and edge attributes fed to the model's embeddings."""

from __future__ import annotations

import numpy as np

EDGE_ATTRIBUTES = ("length", "direction_east", "direction_north")
NODE_ATTRIBUTES = ("sin_lat", "cos_lat", "sin_lon", "cos_lon")


def node_attributes(latlon: np.ndarray) -> np.ndarray:
    """``[N, 4]`` float32: sin/cos of latitude and longitude."""
    lat, lon = latlon[:, 0], latlon[:, 1]
    return np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)], 1).astype(np.float32)


def edge_attributes(src_xyz: np.ndarray, dst_xyz: np.ndarray) -> np.ndarray:
    """``[E, 3]`` float32 attributes of edges ``src -> dst`` given their endpoints' unit vectors.

    Columns: great-circle length divided by the longest edge of the set (in ``[0, 1]``), and the unit
    direction from the destination towards the source in the destination's local tangent frame
    (east, north components; ``(0, 0)`` for a zero-length edge, and east = x at the poles).
    """
    cos_angle = np.clip(np.einsum("ij,ij->i", src_xyz, dst_xyz), -1.0, 1.0)
    length = np.arccos(cos_angle)
    longest = length.max() if length.size else 1.0
    east, north = tangent_frame(dst_xyz)
    tangent = src_xyz - cos_angle[:, None] * dst_xyz  # component of src orthogonal to dst
    norm = np.linalg.norm(tangent, axis=1)
    scale = np.where(norm > 1e-12, 1.0 / np.maximum(norm, 1e-300), 0.0)
    d_east = np.einsum("ij,ij->i", tangent, east) * scale
    d_north = np.einsum("ij,ij->i", tangent, north) * scale
    rel_length = length / longest if longest > 0 else length
    return np.stack([rel_length, d_east, d_north], 1).astype(np.float32)


def tangent_frame(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit east and north vectors at each point; at the poles east is the x axis."""
    east = np.stack([-xyz[:, 1], xyz[:, 0], np.zeros(len(xyz))], 1)
    norm = np.linalg.norm(east, axis=1, keepdims=True)
    polar = norm[:, 0] < 1e-12
    east = np.where(polar[:, None], np.array([[1.0, 0.0, 0.0]]), east / np.maximum(norm, 1e-300))
    north = np.cross(xyz, east)
    return east, north
