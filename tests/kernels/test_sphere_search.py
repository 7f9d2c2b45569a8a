"""The sphere-search kernels (squall.kernels.sphere_search) against their reference, the torch
path of squall.graphs.search: the same neighbours, distances and order, bit for bit.

On a machine without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py); on a GPU both are compared there and the kernels against the CPU.
Sizes are small and odd (interpreted kernels cost ~1 ms per candidate step of a block); the
sets still put several programs' worth of queries across poles, the dateline, duplicates,
empty results and sources clustered far from most queries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from squall.errors import GraphError
from squall.graphs import grids, search
from squall.kernels import sphere_search

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not sphere_search.interpreting(),
    reason="needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_latlon(rng, n, lat_range=(-90, 90), lon_range=(0, 360)):
    z = rng.uniform(*np.sin(np.radians(lat_range)), n)
    lon = rng.uniform(*lon_range, n) % 360
    return np.stack([np.arcsin(z), np.radians(lon)], 1)


def awkward_queries(rng, n):
    """``n`` random places, both poles, both sides of the dateline, a point twice."""
    special = np.array([[math.pi / 2, 0.0], [-math.pi / 2, 2.0], [0.2, 0.0],
                        [0.2, np.nextafter(2 * math.pi, 0)], [-0.7, 6.2831]])  # fmt: skip
    pts = np.concatenate([special, random_latlon(rng, n)])
    return np.concatenate([pts, pts[-2:]])


def both(monkeypatch, fn):
    """``fn()`` on the torch path (CPU) and through the kernels (on ``DEVICE``)."""
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "0")
    want = fn("cpu")
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "1")
    got = fn(DEVICE)
    return want, [t.cpu() for t in got]


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(11)
    uniform = random_latlon(rng, 201)
    # each point three times in shuffled order: distance ties broken by source index
    dup = uniform[:43][rng.permutation(np.repeat(np.arange(43), 3))]
    cluster = random_latlon(rng, 61, (55, 70), (340, 375))  # across the dateline, far away
    return {"uniform": uniform, "dup": dup, "cluster": cluster,
            "queries": awkward_queries(rng, 90)}  # fmt: skip


@pytest.mark.parametrize(("name", "k"), [("uniform", 3), ("dup", 4), ("cluster", 6)])
def test_knn_kernel_equals_torch_path(monkeypatch, sets, name, k):
    """Exact k nearest: ``k <= 4`` in sorted registers, ``k`` 6 in the padded register tile (and
    the cluster sends most queries through widening rounds)."""
    src, queries = sets[name], sets["queries"]

    def run(device):
        return search.knn(search.SphereIndex.build(src, device), queries, k)

    (want_idx, want_d2), (idx, d2) = both(monkeypatch, run)
    assert torch.equal(idx, want_idx) and torch.equal(d2, want_d2)
    if name == "dup":  # a query on a tripled source finds its three copies, nearest first
        on = np.flatnonzero((src[:, None] == queries[None, -1]).all(2).any(1))
        assert len(on) in (0, 3)


@pytest.mark.parametrize(("name", "r", "cap"), [("dup", 0.2, 4), ("cluster", 0.25, None),
                                                ("dup", 0.0, None)])  # fmt: skip
def test_radius_kernel_equals_torch_path(monkeypatch, sets, name, r, cap):
    """Same pairs in the same order; the cap (ties in triples) sends crowded queries to the
    torch path inside the kernel route; radius 0 finds exactly the duplicates on a query."""
    src, queries = sets[name], sets["queries"]
    monkeypatch.setattr(sphere_search, "BLOCK", 32)  # several programs, a partial last one

    def run(device):
        index = search.SphereIndex.build(src, device)
        if name == "cluster" and device == DEVICE:  # a precomputed order (as for a fixed mesh)
            lat, lon = (torch.from_numpy(queries[:, i]).to(device) for i in (0, 1))
            order = search.spatial_order(lat, lon)
            return search.radius(index, queries, r, cap, query_order=order)
        return search.radius(index, queries, r, cap)

    want, got = both(monkeypatch, run)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    if name == "cluster":  # most queries are far from the cluster: empty rows
        assert 0 < len(torch.unique(want[0])) < len(queries) // 2
    if cap is not None:
        assert int(torch.bincount(want[0]).max()) == cap  # the cap binds somewhere


def test_structured_grids_and_large_k_keep_the_torch_path(monkeypatch):
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "1")
    grid = search.SphereIndex.build(grids.octahedral_gaussian(4).latlon, DEVICE)
    mesh = search.SphereIndex.build(grids.icosahedral_mesh(1).latlon, DEVICE)
    assert not search.use_kernel(grid)
    assert search.use_kernel(mesh) and not search.use_kernel(mesh, sphere_search.MAX_K + 1)
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "0")
    assert not search.use_kernel(mesh)
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "yes")
    with pytest.raises(GraphError, match="choose auto, 0 or 1"):
        search.use_kernel(mesh)
    # on the CPU the kernels exist only through the interpreter; by default the CPU is torch's
    cpu_mesh = search.SphereIndex.build(grids.icosahedral_mesh(1).latlon)
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "auto")
    assert not search.use_kernel(cpu_mesh)
    monkeypatch.setenv("SQUALL_SEARCH_KERNEL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(GraphError, match="on the CPU needs TRITON_INTERPRET=1"):
        search.use_kernel(cpu_mesh)


def test_cell_table_brackets_every_source():
    """Every banded position lies between its band's entries of its own longitude cell."""
    rng = np.random.default_rng(3)
    index = search.SphereIndex.build(random_latlon(rng, 999))
    cells = sphere_search.cells_per_band(index)
    table = sphere_search.cell_table(index, cells).long().view(-1, cells + 1)
    band = torch.repeat_interleave(torch.arange(len(table)), index.band_count)
    lon = index.key - band.double() * 8
    cell = torch.floor(lon * (cells / (2 * math.pi))).clamp(0, cells - 1).long()
    pos = torch.arange(index.num)
    assert torch.equal(table[:, 0], index.band_start)
    assert torch.equal(table[:, -1], index.band_start + index.band_count)
    assert bool((table[band, cell] <= pos).all()) and bool((pos < table[band, cell + 1]).all())


def test_mesh_order_is_kept_per_mesh_tensor():
    """The observation graphs' query order of a mesh is computed once per mesh tensor, and
    again after the tensor changes in place."""
    from squall.graphs import dynamic

    mesh = torch.from_numpy(grids.icosahedral_mesh(2).latlon)
    first = dynamic._mesh_order(mesh)
    assert dynamic._mesh_order(mesh) is first
    assert torch.equal(torch.sort(first).values, torch.arange(len(mesh)))
    mesh[:, 1] = torch.remainder(mesh[:, 1] + 1.0, 2 * math.pi)
    again = dynamic._mesh_order(mesh)
    assert again is not first
    assert torch.equal(again, search.spatial_order(mesh[:, 0], mesh[:, 1]))
