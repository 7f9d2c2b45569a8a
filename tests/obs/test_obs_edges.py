"""Observation-to-mesh edges against brute force: packed batches of 0, 1, hundreds and 10^5
observations, poles, the dateline, duplicates, empty radius results, packing offsets and the edge
attributes of the static graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from squall.data.observations import ObsBatch, random_places
from squall.errors import GraphError
from squall.graphs import grids
from squall.graphs.attributes import edge_attributes
from squall.graphs.dynamic import brute_force_edges, mesh_frames, observation_edges
from squall.graphs.edges import nearest_neighbour_spacing
from squall.kernels.edge_index import EdgeIndex

# Radius factor reaching every point of the sphere from a level-2 mesh: its largest triangle
# circumradius is 0.660 x its largest nearest-neighbour spacing (0.583 at level 4, where the
# configs' 0.6 suffices).
COVERING_FACTOR_L2 = 0.67


def _mesh(level: int, factor: float = COVERING_FACTOR_L2):
    mesh = grids.icosahedral_mesh(level, "hidden")
    chord = factor * float(nearest_neighbour_spacing(mesh).max())
    return mesh, torch.from_numpy(mesh.latlon), mesh_frames(torch.from_numpy(mesh.xyz)), chord


def _awkward(rng, n: int) -> np.ndarray:
    """``n`` random places plus both poles, points on the dateline (0 and just below 2 pi) and
    a duplicated point."""
    special = np.array([[math.pi / 2, 0.0], [-math.pi / 2, 1.0], [0.3, 0.0],
                        [0.3, np.nextafter(2 * math.pi, 0)], [-1.2, 6.28]])  # fmt: skip
    pts = np.concatenate([random_places(rng, n), special])
    return np.concatenate([pts, pts[:3]])  # duplicates


def _pack(parts):
    return ObsBatch.pack(
        (torch.from_numpy(p), torch.zeros(len(p), 1), torch.ones(len(p), 1, dtype=torch.bool))
        for p in parts
    )


def _edges(graph):
    """``(dst, src)`` of an ObsGraph in CSC order."""
    counts = graph.index.colptr.diff()
    dst = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return dst, graph.index.row


@pytest.mark.parametrize("cap", [None, 3])
def test_packed_batch_equals_brute_force(cap):
    rng = np.random.default_rng(0)
    mesh, latlon, frame, chord = _mesh(2)
    parts = [_awkward(rng, 0)[:0], random_places(rng, 1), _awkward(rng, 400), _awkward(rng, 0)]
    obs = _pack(parts)
    graph = observation_edges(obs.latlon, obs.offsets, latlon, frame, chord, cap)
    dst, src = _edges(graph)
    ref_dst, ref_src = brute_force_edges(obs.latlon, obs.offsets, latlon, frame[:, 0], chord, cap)
    assert graph.num_samples == 4 and graph.num_mesh == len(mesh)
    assert torch.equal(dst, ref_dst) and torch.equal(src, ref_src)
    # packing: no edge joins two samples; each sample's edges are one contiguous run
    sample_of_src = torch.searchsorted(obs.offsets, src, right=True) - 1
    assert torch.equal(sample_of_src, dst // len(mesh))
    per_sample = torch.bincount(sample_of_src, minlength=4)
    assert torch.equal(graph.edge_offsets.diff(), per_sample)
    assert per_sample[0] == 0 and per_sample[1] >= 1  # one observation reaches some mesh node
    if cap is not None:
        assert int(graph.index.colptr.diff().max()) <= cap
    # every observation of the uncapped graph reaches a mesh node (the factor covers the sphere)
    if cap is None:
        assert torch.equal(torch.unique(src), torch.arange(obs.offsets[-1]))


def test_attributes_are_those_of_the_static_graphs():
    rng = np.random.default_rng(1)
    mesh, latlon, frame, chord = _mesh(2)
    obs = _pack([_awkward(rng, 300)])
    graph = observation_edges(obs.latlon, obs.offsets, latlon, frame, chord)
    dst, src = _edges(graph)
    obs_xyz = grids.latlon_to_xyz(obs.latlon.numpy())
    ref = edge_attributes(obs_xyz, mesh.xyz, src.numpy(), dst.numpy())
    a, b = obs_xyz[src.numpy()], mesh.xyz[dst.numpy()]
    angle = 2 * np.arcsin(np.linalg.norm(a - b, axis=1) / 2)
    eps = np.finfo(np.float32).eps
    # float32 results of float64 maths: a few float32 roundings apart. The static attribute
    # divides by its set's longest edge, the dynamic one by the cutoff angle.
    length = graph.attrs[:, 0].numpy().astype(np.float64)
    np.testing.assert_allclose(length * (2 * math.asin(chord / 2)), angle, rtol=4 * eps)
    np.testing.assert_allclose(length / length.max(), ref[:, 0], rtol=8 * eps, atol=8 * eps)
    np.testing.assert_allclose(graph.attrs[:, 1:].numpy(), ref[:, 1:], atol=8 * eps)
    assert float(graph.attrs[:, 0].max()) <= 1.0


def test_large_sample_equals_brute_force():
    """10^5 observations in one sample (the largest count of conf/data/obs_o96.yaml) on a
    level-1 mesh (42 nodes: the brute force stays a 4 M-pair matrix)."""
    rng = np.random.default_rng(2)
    mesh, latlon, frame, chord = _mesh(1, 0.67)
    obs = _pack([random_places(rng, 100_000), random_places(rng, 7)])
    graph = observation_edges(obs.latlon, obs.offsets, latlon, frame, chord, 64)
    dst, src = _edges(graph)
    ref_dst, ref_src = brute_force_edges(obs.latlon, obs.offsets, latlon, frame[:, 0], chord, 64)
    assert torch.equal(dst, ref_dst) and torch.equal(src, ref_src)
    assert int(graph.index.colptr.diff()[: len(mesh)].min()) == 64  # dense: every node capped


def test_empty_radius_results_give_a_valid_empty_graph():
    rng = np.random.default_rng(3)
    _, latlon, frame, _ = _mesh(2)
    obs = _pack([random_places(rng, 50), random_places(rng, 0)])
    graph = observation_edges(obs.latlon, obs.offsets, latlon, frame, 1e-9)
    assert graph.num_edges == 0 and graph.attrs.shape == (0, 3)
    assert torch.equal(graph.index.colptr, torch.zeros(2 * len(latlon) + 1, dtype=torch.int64))
    assert torch.equal(graph.edge_offsets, torch.zeros(3, dtype=torch.int64))
    assert graph.index.num_src == 50 and graph.index.rowptr[-1] == 0
    # the CSR view agrees with a freshly built index
    ref = EdgeIndex.from_csc(graph.index.colptr, graph.index.row, 50)
    assert torch.equal(ref.rowptr, graph.index.rowptr)


def test_bad_inputs_are_one_line_errors():
    _, latlon, frame, chord = _mesh(1, 0.6)
    pts = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(GraphError, match="offsets"):
        observation_edges(pts, torch.tensor([0, 3]), latlon, frame, chord)
    with pytest.raises(GraphError, match="offsets"):
        observation_edges(pts, torch.tensor([0, 3, 2, 4]), latlon, frame, chord)
    with pytest.raises(GraphError, match=r"\[N, 2\]"):
        observation_edges(torch.zeros(4, 3), torch.tensor([0, 4]), latlon, frame, chord)
    with pytest.raises(GraphError, match="chord"):
        observation_edges(pts, torch.tensor([0, 4]), latlon, frame, 0.0)
