import numpy as np
import pytest

from squall.graphs import build_graph
from squall.graphs.grids import octahedral_gaussian


def tiny_spec(lat=None, lon=None):
    """O8 grid (544 points, optionally given as a point set) and a level-2 mesh (162 nodes)."""
    data = {"type": "grid", "grid": "O8"}
    if lat is not None:
        data = {"type": "points", "latitudes": lat.tolist(), "longitudes": lon.tolist()}
    return {
        "name": "o8_l2",
        "nodes": {"data": data, "hidden": {"type": "icosahedral", "level": 2}},
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    }


@pytest.fixture(scope="session", name="tiny_spec")
def tiny_spec_fixture():
    return tiny_spec


@pytest.fixture(scope="session")
def tiny_graph():
    return build_graph(tiny_spec())


@pytest.fixture(scope="session")
def o8_latlon_deg():
    return np.degrees(octahedral_gaussian(8).latlon)
