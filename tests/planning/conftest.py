"""Small real graphs for the scaling-model tests (built in well under a second)."""

from __future__ import annotations

import pytest

from squall.graphs import build_graph


def spec(grid: str, level: int) -> dict:
    return {
        "name": f"{grid.lower()}_l{level}",
        "nodes": {"data": {"type": "grid", "grid": grid},
                  "hidden": {"type": "icosahedral", "level": level}},
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.6},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    }  # fmt: skip


@pytest.fixture(scope="session")
def small_graph():
    """O16 grid (1,600 points), level-3 mesh (642 nodes): enough parts for P up to 64."""
    return build_graph(spec("O16", 3))
