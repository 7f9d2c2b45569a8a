"""Exact sphere search (squall.graphs.search) against brute force, and the graph builders' search
paths (torch on the CPU, scipy KD-trees) against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squall.errors import GraphError
from squall.graphs import build_graph, edges, grids, search
from squall.graphs.attributes import edge_attributes, edge_attributes_torch

# Every check runs on the CPU and, where there is one, on the GPU: the results must be the same bits.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def brute_knn(src_latlon, dst_latlon, k):
    """k nearest by (d2, source index), by sorting every distance."""
    src_xyz, dst_xyz = grids.latlon_to_xyz(src_latlon), grids.latlon_to_xyz(dst_latlon)
    d2 = search.squared_chords(src_xyz[None], dst_xyz[:, None])
    order = np.lexsort((np.broadcast_to(np.arange(len(src_xyz)), d2.shape), d2), axis=1)[:, :k]
    return order, np.take_along_axis(d2, order, 1)


def brute_radius(src_latlon, dst_latlon, r):
    src_xyz, dst_xyz = grids.latlon_to_xyz(src_latlon), grids.latlon_to_xyz(dst_latlon)
    d2 = search.squared_chords(src_xyz[None], dst_xyz[:, None])
    q, s = np.nonzero(d2 <= r * r)  # row-major: by query, then source
    return q, s, d2[q, s]


def random_latlon(rng, n, lat_range=(-90, 90), lon_range=(0, 360)):
    """Uniform on the sphere (or in a lat/lon box), radians."""
    z = rng.uniform(*np.sin(np.radians(lat_range)), n)
    lon = rng.uniform(*lon_range, n) % 360
    return np.stack([np.arcsin(z), np.radians(lon)], 1)


def check_knn(src_latlon, dst_latlon, k):
    want_idx, want_d2 = brute_knn(src_latlon, dst_latlon, k)
    for device in DEVICES:
        index = search.SphereIndex.build(src_latlon, device)
        idx, d2 = search.knn(index, dst_latlon, k)
        assert np.array_equal(idx.cpu().numpy(), want_idx), device
        assert np.array_equal(d2.cpu().numpy(), want_d2), device


def check_radius(src_latlon, dst_latlon, r):
    want = brute_radius(src_latlon, dst_latlon, r)
    for device in DEVICES:
        index = search.SphereIndex.build(src_latlon, device)
        got = search.radius(index, dst_latlon, r)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a.cpu().numpy(), b), device
    return len(want[0])


@pytest.mark.parametrize("k", [1, 4, 17])
def test_knn_random_sets_equal_brute_force(k):
    rng = np.random.default_rng(k)
    # uniform sources, and a cluster (dense inside, empty elsewhere) with global queries
    check_knn(random_latlon(rng, 1500), random_latlon(rng, 300), k)
    cluster = random_latlon(rng, 1000, (30, 40), (350, 370))
    check_knn(cluster, random_latlon(rng, 200), k)


def test_structured_grids_use_their_rows_and_equal_brute_force():
    o8 = grids.octahedral_gaussian(8)
    ll = grids.latlon_grid(10.0)  # pole rows: 36 copies of each pole (duplicate points)
    assert search.SphereIndex.build(o8.latlon).structured
    assert search.SphereIndex.build(ll.latlon).structured
    assert not search.SphereIndex.build(grids.icosahedral_mesh(2).latlon).structured
    assert not search.SphereIndex.build(
        grids.latlon_grid(5.0, bounds=(0, 20, 350, 10)).latlon
    ).structured
    # queries at both poles, on the dateline either side, and exactly on grid points
    special = np.radians([[90, 0], [-90, 123], [89.99, 359.999], [0, 0], [-45, 359.9999999],
                          [10, 180], [-89.5, 0.0001]])  # fmt: skip
    rng = np.random.default_rng(1)
    queries = np.concatenate([special, random_latlon(rng, 300), o8.latlon[::7]])
    for src in (o8, ll):
        for k in (1, 3, 30, 100):  # O8's polar rows hold 20 points, lat-lon 10 deg ones 36
            check_knn(src.latlon, queries, k)


def test_tensor_inputs_and_longitudes_from_minus_180():
    rng = np.random.default_rng(8)
    src, dst = random_latlon(rng, 800), random_latlon(rng, 200)
    want_idx, want_d2 = brute_knn(src, dst, 5)
    shifted = src.copy()
    shifted[:, 1] = np.where(src[:, 1] >= np.pi, src[:, 1] - 2 * np.pi, src[:, 1])
    xyz = torch.from_numpy(grids.latlon_to_xyz(src))  # the same unit vectors
    index = search.SphereIndex.build(torch.from_numpy(shifted), xyz=xyz)
    idx, d2 = search.knn(
        index, torch.from_numpy(dst), 5, torch.from_numpy(grids.latlon_to_xyz(dst))
    )
    assert np.array_equal(idx.numpy(), want_idx) and np.array_equal(d2.numpy(), want_d2)


def test_duplicate_points_tie_by_index():
    rng = np.random.default_rng(2)
    base = random_latlon(rng, 200)
    src = base[rng.permutation(np.repeat(np.arange(200), 3))]  # each point three times
    idx, d2 = search.knn(search.SphereIndex.build(src), base, 3)
    for q in range(0, 200, 11):
        copies = np.flatnonzero((src == base[q]).all(1))
        assert np.array_equal(idx[q].numpy(), copies) and (d2[q] == 0).all()
    check_knn(src, base, 5)
    assert check_radius(src, base, 0.0) == 600  # radius 0 finds exactly the copies


def test_queries_far_outside_a_limited_area_grid():
    lam = grids.latlon_grid(0.5, bounds=(43, 49, 4, 17))
    rng = np.random.default_rng(3)
    far = random_latlon(rng, 200)  # mostly thousands of km away: the search widens
    check_knn(lam.latlon, far, 4)
    dateline = grids.latlon_grid(1.0, bounds=(-10, 10, 170, -170))  # box across 180 deg
    check_knn(dateline.latlon, random_latlon(rng, 200), 7)


def test_radius_equals_brute_force_including_empty_results():
    rng = np.random.default_rng(4)
    src = grids.octahedral_gaussian(12).latlon
    queries = np.concatenate([random_latlon(rng, 300), np.radians([[90, 0], [-90, 0]])])
    for r in (0.0, 1e-4, 0.05, 0.3, 2.0):
        found = check_radius(src, queries, r)
        if r == 1e-4:  # far below the grid spacing: nearly every query finds nothing
            assert found < 5
    lam = grids.latlon_grid(1.0, bounds=(43, 49, 4, 17)).latlon
    assert check_radius(lam, random_latlon(rng, 50, (-80, -20)), 0.1) == 0  # all empty
    check_radius(random_latlon(rng, 2000), queries, 0.2)


def test_radius_cap_keeps_the_nearest_by_distance_then_index():
    rng = np.random.default_rng(5)
    src = np.repeat(random_latlon(rng, 500), 2, axis=0)  # ties in pairs
    queries = random_latlon(rng, 100)
    index = search.SphereIndex.build(src)
    q, s, d2 = search.radius(index, queries, 0.4, max_neighbours=5)
    want_idx, _ = brute_knn(src, queries, 5)
    _, _, all_d2 = brute_radius(src, queries, 0.4)
    for row in range(len(queries)):
        got = s[q == row].numpy()
        within = want_idx[row][search.squared_chords(
            grids.latlon_to_xyz(src[want_idx[row]]), grids.latlon_to_xyz(queries[row:row + 1])
        ) <= 0.16]  # fmt: skip
        assert np.array_equal(got, np.sort(within))
    assert (d2.numpy() <= 0.16).all() and len(all_d2) >= len(d2)


def test_search_errors_are_one_line():
    index = search.SphereIndex.build(grids.octahedral_gaussian(2).latlon)
    with pytest.raises(GraphError, match="k=0 must be between 1 and the number of sources"):
        search.knn(index, np.zeros((1, 2)), 0)
    with pytest.raises(GraphError, match="radius must be >= 0"):
        search.radius(index, np.zeros((1, 2)), -1.0)
    with pytest.raises(GraphError, match=r"need a non-empty \[N, 2\]"):
        search.SphereIndex.build(np.zeros((0, 2)))


def test_search_device_switch(monkeypatch):
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "scipy")
    assert search.search_device() is None
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "cpu")
    assert search.search_device() == torch.device("cpu")
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "gpu")
    with pytest.raises(GraphError, match="choose auto, scipy, cpu or cuda"):
        search.search_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "cuda")
        with pytest.raises(GraphError, match="no CUDA device"):
            search.search_device()


def test_scipy_path_breaks_ties_by_index(monkeypatch):
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "scipy")
    rng = np.random.default_rng(6)
    base = random_latlon(rng, 300)
    src = grids.NodeSet("src", base[rng.permutation(np.repeat(np.arange(300), 4))], np.ones(1200))
    dst = grids.NodeSet("dst", random_latlon(rng, 400), np.ones(400))
    for k in (1, 2, 6):
        idx, d2 = edges.nearest(src, dst, k)
        want_idx, want_d2 = brute_knn(src.latlon, dst.latlon, k)
        assert np.array_equal(idx, want_idx) and np.array_equal(d2, want_d2)


SPECS = {
    "global": {
        "nodes": {
            "data": {"type": "grid", "grid": "O24"},
            "hidden": {"type": "icosahedral", "level": 3},
        },
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.6},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    },
    "lam": {
        "nodes": {
            "data": {"type": "latlon", "resolution": 0.5, "region": [43, 49, 4, 17]},
            "hidden": {"type": "icosahedral", "level": 5, "region": [40, 52, 0, 21]},
        },
        "edges": {
            "encoder": {
                "src": "data",
                "dst": "hidden",
                "type": "cutoff",
                "factor": 0.6,
                "max_neighbours": 4,
                "min_neighbours": 1,
            },
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 4},
        },
    },
    "stretched": {
        "nodes": {
            "data": {
                "type": "stretched_grid",
                "global_grid": "O16",
                "regional_resolution": 1.0,
                "region": [50, 72, -5, 35],
            },
            "hidden": {
                "type": "stretched_mesh",
                "level": 3,
                "fine_level": 5,
                "region": [50, 72, -5, 35],
                "margin_deg": 5,
            },
        },
        "edges": {
            "encoder": {
                "src": "data",
                "dst": "hidden",
                "type": "cutoff",
                "factor": 0.5,
                "min_neighbours": 2,
                "max_neighbours": 1,
            },
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    },
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_builders_build_the_same_graph_on_every_search_path(monkeypatch, name):
    graphs = {}
    for mode in ("scipy", *DEVICES):
        monkeypatch.setenv("SQUALL_GRAPH_SEARCH", mode)
        graphs[mode] = build_graph({"name": name, **SPECS[name]})
    for edge_name, a in graphs["scipy"].edges.items():
        b = graphs["cpu"].edges[edge_name]
        assert np.array_equal(a.colptr, b.colptr), edge_name
        assert np.array_equal(a.row, b.row), edge_name
        assert np.array_equal(a.attrs, b.attrs), edge_name
        if "cuda" in graphs:  # same edges; attributes computed on the GPU to float32 rounding
            c = graphs["cuda"].edges[edge_name]
            assert np.array_equal(a.colptr, c.colptr) and np.array_equal(a.row, c.row), edge_name
            assert np.abs(a.attrs - c.attrs).max() <= np.finfo(np.float32).eps, edge_name
    # knn edges are the brute-force nearest
    g = graphs["cpu"]
    dec = g.edges["decoder"]
    k = SPECS[name]["edges"]["decoder"]["k"]
    want, _ = brute_knn(g.nodes["hidden"].latlon, g.nodes["data"].latlon, k)
    assert np.array_equal(dec.row.reshape(-1, k), np.sort(want, axis=1))


def test_cutoff_matches_brute_force_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "cpu")
    src, dst = grids.grid_from_name("O16"), grids.icosahedral_mesh(2)
    s, d = edges.cutoff_edges(src, dst, 0.8)
    spacing = edges.nearest_neighbour_spacing(dst)
    d2_all = search.squared_chords(dst.xyz[:, None], dst.xyz[None])
    np.fill_diagonal(d2_all, np.inf)
    assert np.array_equal(spacing, np.sqrt(d2_all.min(1)))
    radius = 0.8 * spacing.max()
    q, want_s, _ = brute_radius(src.latlon, dst.latlon, radius)
    assert np.array_equal(d, q) and np.array_equal(s, want_s)


def test_device_attributes_equal_numpy_to_float32_rounding():
    src, dst = grids.grid_from_name("O16"), grids.icosahedral_mesh(3)
    s, d = edges.knn_edges(src, dst, 5)
    want = edge_attributes(src.xyz, dst.xyz, s, d)
    for device in DEVICES:
        got = edge_attributes_torch(src.xyz, dst.xyz, s, d, torch.device(device), chunk=1000)
        # float64 maths rounded to float32: the two libraries may differ by one float32 step
        # (values are at most 1 in magnitude)
        assert np.abs(got - want).max() <= np.finfo(np.float32).eps, device


@pytest.mark.slow
def test_knn_and_radius_larger_sets_equal_brute_force():
    rng = np.random.default_rng(7)
    mesh = grids.icosahedral_mesh(5).latlon
    queries = np.concatenate([grids.octahedral_gaussian(32).latlon[::3], random_latlon(rng, 2000)])
    for k in (3, 9):
        check_knn(mesh, queries, k)
        check_knn(grids.octahedral_gaussian(48).latlon, queries[::2], k)
    check_radius(grids.octahedral_gaussian(48).latlon, queries[::4], 0.03)
