"""Small synthetic datasets shared by the data tests (generated once per session)."""

from __future__ import annotations

import pytest

from squall.data.synthetic import SyntheticSettings, generate
from squall.graphs.grids import grid_from_name

# O16: 1,600 points, the smallest octahedral grid with synoptic blobs (>= 8 deg) several grid
# lengths (5.6 deg) wide.
GRID = "O16"


@pytest.fixture(scope="session")
def grid():
    return grid_from_name(GRID)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, grid):
    """60 six-hourly times on O16 with the default variables."""
    path = tmp_path_factory.mktemp("data") / "o16.zarr"
    settings = SyntheticSettings(num_times=60, seed=3, block=16)
    return generate(path, grid, settings, grid_name=GRID), settings


@pytest.fixture(scope="session")
def long_dataset(tmp_path_factory):
    """300 six-hourly times on O24 (3,168 points): enough to fit and test a predictor."""
    path = tmp_path_factory.mktemp("data") / "o24.zarr"
    nodes = grid_from_name("O24")
    return generate(path, nodes, SyntheticSettings(num_times=300, seed=1), grid_name="O24"), nodes
