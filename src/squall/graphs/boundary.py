"""Boundary points of a data node set: the points a driving model forces instead of the network.

A graph spec marks them on its ``data`` node set::

    nodes:
      data: {type: latlon, resolution: 0.1, region: [43, 49, 4, 17],
             boundary: {type: band, width_deg: 1.5}}

Types:

``band`` (limited-area models)
    Every point closer than ``width_deg`` to the edge of the node set's ``region``, the distance
    measured along each coordinate in degrees (of latitude for the southern and northern edges,
    of longitude for the western and eastern ones, as a lat-lon box is drawn).
``outside`` (a stretched grid whose coarse outer part is driven rather than predicted)
    Every point outside ``region`` (by default the node set's own region, the fine part).

The remaining points are the *interior*: predicted by the model, scored, and each of them must be
a source of the encoder (see :func:`check_coverage`, run by every graph build), so every grid
point is either encoded or forced.
"""

from __future__ import annotations

import numpy as np

from squall.errors import GraphError
from squall.graphs.grids import NodeSet, in_box

BOUNDARY_TYPES = ("band", "outside")
# Points within 1e-9 deg of the band's inner edge count as outside it, so that a band of
# 1.5 deg on a 0.1 deg grid holds exactly 15 rows despite the degree/radian round trip.
_TOL_DEG = 1e-9


def boundary_spec(graph_spec: dict, name: str = "data") -> dict | None:
    """The ``boundary`` entry of node set ``name`` in a graph spec, or None."""
    node = ((graph_spec or {}).get("nodes") or {}).get(name) or {}
    spec = node.get("boundary") if isinstance(node, dict) else None
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in BOUNDARY_TYPES:
        raise GraphError(f"nodes.{name}.boundary must be a mapping with type one of "
                         f"{', '.join(BOUNDARY_TYPES)}; got {spec!r}")  # fmt: skip
    return dict(spec)


def _region(nodes: NodeSet, spec: dict, node_spec: dict) -> list[float]:
    region = spec.get("region") or node_spec.get("region") or nodes.meta.get("region")
    if region is None or len(region) != 4:
        raise GraphError(f"node set {nodes.name!r}: a {spec['type']} boundary needs a region "
                         "[lat_min, lat_max, lon_min, lon_max] (the node set's or its own)")  # fmt: skip
    return [float(x) for x in region]


def boundary_mask(nodes: NodeSet, spec: dict, node_spec: dict | None = None) -> np.ndarray:
    """``[N]`` bool: which points of ``nodes`` the boundary ``spec`` forces.

    Parameters
    ----------
    nodes : NodeSet
        The data node set.
    spec : dict
        Its ``boundary`` entry (see the module docstring).
    node_spec : dict, optional
        The node set's own spec (for its ``region``).
    """
    region = _region(nodes, spec, node_spec or {})
    if spec["type"] == "outside":
        return ~in_box(nodes.latlon, region)
    width = spec.get("width_deg")
    try:
        width = float(width)
    except (TypeError, ValueError):
        width = float("nan")
    lat_min, lat_max, lon_min, lon_max = region
    if not 0 < width <= 0.5 * (lat_max - lat_min):
        raise GraphError(f"node set {nodes.name!r}: boundary width_deg={spec.get('width_deg')} "
                         f"must be > 0 and at most half the region's height "
                         f"({0.5 * (lat_max - lat_min):g} deg)")  # fmt: skip
    lat, lon = np.degrees(nodes.latlon[:, 0]), np.degrees(nodes.latlon[:, 1])
    span = (lon_max - lon_min) % 360.0 or 360.0
    east = (lon - lon_min) % 360.0
    d_lon = np.minimum(east, span - east)
    d_lat = np.minimum(lat - lat_min, lat_max - lat)
    return np.minimum(d_lat, d_lon) < width - _TOL_DEG


def check_coverage(nodes: NodeSet, mask: np.ndarray, out_degree: np.ndarray, edges: str) -> None:
    """Raise :class:`GraphError` unless every interior point (``~mask``) is a source of ``edges``
    (its ``out_degree`` > 0): a point neither encoded nor forced would be predicted from nothing
    it holds."""
    lost = ~mask & (out_degree == 0)
    if lost.any():
        where = np.degrees(nodes.latlon[np.flatnonzero(lost)[0]])
        raise GraphError(
            f"node set {nodes.name!r}: {int(lost.sum())} interior point(s) (first at lat "
            f"{where[0]:.3f}, lon {where[1]:.3f}) are not sources of the {edges} edges: widen the "
            "boundary band, raise the mesh's margin_deg or the encoder's factor")  # fmt: skip
