from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from squall.errors import GraphError
from squall.graphs import edges, grids
from squall.graphs.attributes import edge_attributes, node_attributes


def _brute_knn(src, dst, k):
    d = np.linalg.norm(dst.xyz[:, None, :] - src.xyz[None, :, :], axis=-1)
    return np.sort(np.argsort(d, axis=1, kind="stable")[:, :k], axis=1)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    src = grids.point_set(rng.uniform(-90, 90, 300), rng.uniform(0, 360, 300), "src")
    dst = grids.point_set(rng.uniform(-90, 90, 120), rng.uniform(0, 360, 120), "dst")
    s, d = edges.knn_edges(src, dst, 4)
    assert len(s) == 4 * len(dst)
    got = np.sort(s.reshape(len(dst), 4), axis=1)
    assert np.array_equal(got, _brute_knn(src, dst, 4))
    assert np.array_equal(d, np.repeat(np.arange(len(dst)), 4))


def test_knn_k_larger_than_sources():
    src = grids.icosahedral_mesh(0)
    with pytest.raises(GraphError, match="k=13 must be between 1 and the number of source nodes"):
        edges.knn_edges(src, grids.grid_from_name("O4"), 13)


def test_cutoff_matches_brute_force_and_cap():
    src, dst = grids.grid_from_name("O16"), grids.icosahedral_mesh(2)
    s, d = edges.cutoff_edges(src, dst, 0.8)
    radius = 0.8 * edges.nearest_neighbour_spacing(dst).max()
    dist = np.linalg.norm(dst.xyz[:, None] - src.xyz[None], axis=-1)
    want = set(zip(*np.nonzero(dist <= radius), strict=True))
    assert set(zip(d.tolist(), s.tolist(), strict=True)) == want
    s2, d2 = edges.cutoff_edges(src, dst, 0.8, max_neighbours=2)
    assert np.bincount(d2).max() <= 2
    # the kept ones are the nearest
    for node in range(0, len(dst), 17):
        kept = np.sort(dist[node, s2[d2 == node]])
        assert np.allclose(kept, np.sort(dist[node])[: len(kept)])


def test_cutoff_orphans_error_names_counts_and_fix():
    src, dst = grids.grid_from_name("O8"), grids.icosahedral_mesh(4)
    with pytest.raises(GraphError, match=r"leaves \d+ of 2562 destination nodes without edges; use a factor of at least"):
        edges.cutoff_edges(src, dst, 0.3)
    s, d = edges.cutoff_edges(src, dst, 0.3, min_neighbours=1)
    assert np.bincount(d, minlength=len(dst)).min() >= 1


def test_multiscale_counts_exact():
    for level in range(0, 5):
        mesh = grids.icosahedral_mesh(level)
        s, d = edges.multiscale_edges(mesh)
        assert len(s) == 60 * (4 ** (level + 1) - 1) // 3
        pairs = set(zip(s.tolist(), d.tolist(), strict=True))
        assert len(pairs) == len(s), "no duplicate edges"
        assert all((b, a) in pairs for a, b in pairs), "both directions"


def test_multiscale_needs_a_mesh():
    with pytest.raises(GraphError, match="icosahedral"):
        edges.multiscale_edges(grids.grid_from_name("O4"))


def test_unknown_edge_type():
    g = grids.grid_from_name("O4")
    with pytest.raises(GraphError, match="unknown edge type 'radius'"):
        edges.build_edges({"type": "radius"}, g, g)


def test_attributes_in_range():
    src, dst = grids.grid_from_name("O16"), grids.icosahedral_mesh(3)
    s, d = edges.knn_edges(src, dst, 5)
    a = edge_attributes(src.xyz[s], dst.xyz[d])
    assert a.shape == (len(s), 3) and np.isfinite(a).all()
    assert a[:, 0].min() >= 0 and np.isclose(a[:, 0].max(), 1.0)
    assert np.allclose(np.hypot(a[:, 1], a[:, 2]), 1.0, atol=1e-5)
    n = node_attributes(dst.latlon)
    assert n.shape == (len(dst), 4) and np.abs(n).max() <= 1.0
    assert np.allclose(n[:, 0] ** 2 + n[:, 1] ** 2, 1.0, atol=1e-6)


def test_direction_points_towards_source():
    # destination on the equator at lon 0; a source due north and one due east
    dst = grids.point_set([0.0, 0.0], [0.0, 0.0])
    src = grids.point_set([5.0, 0.0], [0.0, 5.0])
    a = edge_attributes(src.xyz, dst.xyz)
    assert np.allclose(a[0, 1:], [0.0, 1.0], atol=1e-6)
    assert np.allclose(a[1, 1:], [1.0, 0.0], atol=1e-6)


def test_device_sort_equals_host_sort():
    """The torch sorts of the CSC/CSR order (a GPU's path, run here on the CPU) give the numpy
    path's permutations, duplicate pairs and equal sources included."""
    from squall.graphs.graph import _sorted_pairs

    rng = np.random.default_rng(3)
    src = rng.integers(0, 50, 5000)
    dst = rng.integers(0, 40, 5000)
    host = _sorted_pairs(src, dst, 50)
    device = _sorted_pairs(src, dst, 50, torch.device("cpu"))
    for a, b in zip(host, device, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.all(np.diff(host[1] * 50 + host[0]) >= 0)


def test_device_pipeline_builds_the_host_edge_sets(monkeypatch):
    """Edges kept as tensors from the torch search, then sorted, pointed and attributed on the
    device (a GPU's path; here on the CPU unless a GPU is present) give the host path's arrays:
    the same edges exactly, attributes to float32 rounding (values at most 1)."""
    from squall.graphs.graph import EdgeSet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src, dst = grids.grid_from_name("O12", "data"), grids.icosahedral_mesh(2, "hidden")
    lam = grids.cut_out(grids.icosahedral_mesh(3, "hidden"), (30, 60, -20, 30))
    specs = {
        "encoder": ({"type": "cutoff", "factor": 0.6}, src, dst),
        "processor": ({"type": "multiscale"}, dst, dst),
        "lam processor": ({"type": "multiscale"}, lam, lam),
        "decoder": ({"type": "knn", "k": 3}, dst, src),
    }
    for name, (spec, a, b) in specs.items():
        monkeypatch.setenv("SQUALL_GRAPH_SEARCH", device.type)
        pairs = edges.build_edges(spec, a, b, keep_on_device=True)
        assert all(isinstance(p, torch.Tensor) and p.device.type == device.type for p in pairs)
        with ThreadPoolExecutor(3) as pool:  # copies to the host on threads, as build_graph
            got = EdgeSet._from_pairs_on(device, name, a, b, *pairs, pool=pool)()
        monkeypatch.setenv("SQUALL_GRAPH_SEARCH", "cpu")  # numpy sorts and attributes
        want = EdgeSet.from_pairs(name, a, b, *edges.build_edges(spec, a, b))
        for field in ("colptr", "row", "rowptr", "csr_perm"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=name)
        assert got.attrs.dtype == np.float32
        assert np.abs(got.attrs - want.attrs).max() <= np.finfo(np.float32).eps, name
    for nodes in (src, dst, lam):
        nodes.drop_device()
        assert "_device_copies" not in nodes.__dict__
