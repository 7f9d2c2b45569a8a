"""Boundary bands, the bounded cutoff encoder and the driver interpolation."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from squall.data.boundary import Interpolation
from squall.errors import GraphError
from squall.graphs import build_graph
from squall.graphs.boundary import boundary_mask
from squall.graphs.edges import DEFAULT_MAX_NEIGHBOURS, build_edges, cutoff_edges
from squall.graphs.grids import latlon_grid, point_set
from squall.graphs.search import squared_chords
from squall.graphs.store import spec_hash

CONF = Path(__file__).resolve().parents[2] / "conf" / "graph"


def small_lam(width=3.0, factor=0.7, level=5):
    """A 1-degree box of 31 x 41 points under a level-5 mesh cut out over it (builds in < 1 s)."""
    region = [30.0, 60.0, 0.0, 40.0]
    return {
        "name": "lam_small",
        "nodes": {
            "data": {"type": "latlon", "resolution": 1.0, "region": region,
                     "boundary": {"type": "band", "width_deg": width}},
            "hidden": {"type": "icosahedral", "level": level, "region": region},
        },
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": factor},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    }  # fmt: skip


def test_band_holds_the_rows_and_columns_within_its_width():
    spec = small_lam(width=3.0)
    nodes = latlon_grid(1.0, "data", spec["nodes"]["data"]["region"])
    mask = boundary_mask(nodes, spec["nodes"]["data"]["boundary"], spec["nodes"]["data"])
    lat, lon = np.degrees(nodes.latlon[:, 0]), np.degrees(nodes.latlon[:, 1])
    # 3 rows / columns at each edge (distances 0, 1, 2 degrees); the 4th (3 degrees) is interior
    inner = (lat > 32.5) & (lat < 57.5) & (lon > 2.5) & (lon < 37.5)
    assert len(nodes) == 31 * 41
    assert (~mask).sum() == 25 * 35
    np.testing.assert_array_equal(mask, ~inner)


def test_band_wider_than_half_the_domain_is_refused():
    spec = small_lam(width=16.0)
    with pytest.raises(GraphError, match="width_deg=16.0 must be > 0 and at most half"):
        build_graph(spec)


def test_interior_point_left_unencoded_fails_the_build():
    # a 1-degree band with a 0.5 factor leaves interior points out of every mesh node's range
    with pytest.raises(GraphError, match=r"interior point\(s\) .* are not sources of the encoder"):
        build_graph(small_lam(width=1.0, factor=0.5))


def test_small_lam_every_point_encoded_or_boundary():
    graph = build_graph(small_lam())
    mask = graph.boundary_mask()
    encoded = np.diff(graph.edges["encoder"].rowptr) > 0
    assert (encoded | mask).all()
    assert graph.statistics()["boundary"] == {"data": int(mask.sum())}


@pytest.mark.slow
def test_lam_alps_every_grid_point_encoded_or_boundary():
    spec = yaml.safe_load((CONF / "lam_alps.yaml").read_text())
    graph = build_graph(spec)  # the build itself checks the interior (12 s on 2 cores)
    mask = graph.boundary_mask()
    encoded = np.diff(graph.edges["encoder"].rowptr) > 0
    assert len(mask) == 7991 and (encoded | mask).all()
    assert 0 < (~encoded).sum() <= mask.sum()  # some box-edge points are only forced
    # the shipped factor is what makes it so: 0.6 (the global graphs') leaves interior points out
    spec["edges"]["encoder"]["factor"] = 0.6
    with pytest.raises(GraphError, match="interior point"):
        build_graph(spec)


@pytest.mark.slow
def test_lam_alps_experiment_graph_encodes_every_interior_point_under_its_cap():
    """``+experiment=lam_alps`` swaps the mesh for level 6 and raises the cap to 256: the build
    checks the interior, and the cap stays above every mesh node's in-degree (no edge dropped)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=lam_alps"])
    spec = OmegaConf.to_container(cfg.graph, resolve=True)
    graph = build_graph(spec)
    encoded = np.diff(graph.edges["encoder"].rowptr) > 0
    assert (encoded | graph.boundary_mask()).all()
    cap = spec["edges"]["encoder"]["max_neighbours"]
    assert graph.statistics()["edges"]["encoder"]["in_degree"]["max"] < cap
    spec["edges"]["encoder"]["max_neighbours"] = cap // 2  # the cap is what the level needs
    with pytest.raises(GraphError, match="interior point"):
        build_graph(spec)


def test_every_shipped_cutoff_spec_is_capped():
    for path in sorted(CONF.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for name, edges in spec["edges"].items():
            if edges["type"] == "cutoff":
                assert edges.get("max_neighbours") == DEFAULT_MAX_NEIGHBOURS, (path.name, name)


def test_default_cap_hashes_like_the_written_cap_and_unlike_no_cap():
    written = small_lam()
    written["edges"]["encoder"]["max_neighbours"] = DEFAULT_MAX_NEIGHBOURS
    left_out, uncapped = small_lam(), small_lam()
    uncapped["edges"]["encoder"]["max_neighbours"] = None
    assert spec_hash(written) == spec_hash(left_out) != spec_hash(uncapped)


def _ring(n=6, radius_deg=1.0):
    """Sources around (10, 20): ``n`` on a ring, each twice (exact ties in distance), then 5
    farther ones; shuffled so that index order is not angle order."""
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    lat = np.concatenate([np.tile(10 + radius_deg * np.sin(ang), 2), 13 * np.ones(5)])
    lon = np.concatenate([np.tile(20 + radius_deg * np.cos(ang), 2), 20 + np.arange(5)])
    order = np.random.default_rng(3).permutation(len(lat))
    return point_set(lat[order], lon[order], "src")


try:
    import scipy.spatial  # noqa: F401

    HAVE_SCIPY = True
except ImportError:
    HAVE_SCIPY = False
#: Search paths that can run here: scipy KD-trees (GPU machines may have no scipy), torch on the
#: CPU, and the GPU when there is one.
PATHS = [
    pytest.param("scipy", marks=pytest.mark.skipif(not HAVE_SCIPY, reason="scipy not installed")),
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("path", PATHS)
def test_cap_keeps_the_nearest_ties_by_distance_then_index(monkeypatch, path):
    monkeypatch.setenv("SQUALL_GRAPH_SEARCH", path)
    src = _ring()
    # a second destination far away sets the mesh spacing (the radius: 0.02 of it, 1.8 deg)
    dst = point_set([10.0, -60.0], [20.0, 200.0], "dst")
    s, d = cutoff_edges(src, dst, factor=0.02, max_neighbours=5, min_neighbours=1)
    d2 = squared_chords(src.xyz, dst.xyz[:1])
    radius = 0.02 * np.sqrt(squared_chords(dst.xyz[:1], dst.xyz[1:]))[0]
    in_range = np.flatnonzero(d2 <= radius**2)
    assert len(in_range) == 12  # the ring, not the farther ones
    expected = in_range[np.lexsort((in_range, d2[in_range]))][:5]
    # the 5 kept end in the middle of a pair of duplicates: only the index decides which one
    ties = d2[in_range] == d2[expected[-1]]
    assert ties.sum() == 2
    assert np.bincount(d).max() <= 5
    np.testing.assert_array_equal(np.sort(s[d == 0]), np.sort(expected))


def test_cap_on_a_stretched_like_encoder_agrees_across_search_paths(monkeypatch):
    fine = latlon_grid(0.5, "data", [40, 50, 0, 20])
    mesh = point_set([45.0, 42.0, 48.0], [10.0, 5.0, 15.0], "hidden")
    results = {}
    paths = ["scipy"] * HAVE_SCIPY + ["cpu"] + ["cuda"] * torch.cuda.is_available()
    if len(paths) < 2:
        pytest.skip("one search path here (no scipy, no GPU): nothing to compare")
    for path in paths:
        monkeypatch.setenv("SQUALL_GRAPH_SEARCH", path)
        results[path] = build_edges({"type": "cutoff", "factor": 0.5}, fine, mesh)
        full = build_edges({"type": "cutoff", "factor": 0.5, "max_neighbours": None}, fine, mesh)
        s, d = results[path]
        assert np.bincount(d).max() == DEFAULT_MAX_NEIGHBOURS < np.bincount(full[1]).max()
        # each kept source is no farther than every dropped one of its destination
        for node in range(len(mesh)):
            d2 = ((fine.xyz - mesh.xyz[node]) ** 2).sum(axis=1)
            dropped = np.setdiff1d(full[0][full[1] == node], s[d == node])
            assert d2[s[d == node]].max() <= d2[dropped].min()
    for path in paths[1:]:
        for a, b in zip(results[paths[0]], results[path], strict=True):
            np.testing.assert_array_equal(a, b)


def test_interpolation_exact_at_driver_points_and_weights_sum_to_one():
    driver = latlon_grid(2.0, "driver", [30, 60, 0, 40])
    target = latlon_grid(0.5, "t", [35, 55, 5, 35])
    interp = Interpolation.inverse_distance(driver.latlon, target.latlon, k=4)
    np.testing.assert_allclose(interp.weight.sum(axis=1), 1.0, rtol=1e-12)
    values = np.random.default_rng(0).normal(size=len(driver))
    out = interp(values)
    lat, lon = np.degrees(target.latlon).T
    on_driver = (np.abs(lat / 2 - np.round(lat / 2)) < 1e-9) & (
        np.abs(lon / 2 - np.round(lon / 2)) < 1e-9)  # fmt: skip
    dlat, dlon = np.degrees(driver.latlon).T
    for i in np.flatnonzero(on_driver)[:20]:
        j = np.flatnonzero((np.abs(dlat - lat[i]) < 1e-9) & (np.abs(dlon - lon[i]) < 1e-9))[0]
        assert out[i] == values[j]
    # a convex combination: never outside the range of the values it mixes
    mixed = values[interp.index]
    assert ((out >= mixed.min(axis=1) - 1e-12) & (out <= mixed.max(axis=1) + 1e-12)).all()


def test_outside_boundary_drives_a_stretched_grid_coarse_part():
    spec = yaml.safe_load((CONF / "stretched_nordic.yaml").read_text())
    data_spec = {**spec["nodes"]["data"], "boundary": {"type": "outside"}}
    from squall.graphs.graph import build_nodes

    nodes = build_nodes("data", data_spec)
    mask = boundary_mask(nodes, data_spec["boundary"], data_spec)
    # the fine regional points come first, then the O48 points outside the region
    fine = nodes.meta["num_fine"]
    assert not mask[:fine].any() and mask[fine:].all()
