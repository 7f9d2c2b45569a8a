"""The sharded model with an observation encoder against the unsharded one on gloo: each rank
builds the observation edges of its own mesh rows; outputs equal, loss and gradients equal to
fp32 summation noise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_workers import make_model, spawn, tiny_graph  # noqa: E402

from squall.data.observations import ObsBatch, random_places  # noqa: E402
from squall.models.obs_encoder import ObservationEncoder  # noqa: E402
from squall.parallel.parallelize import ParallelConfig, parallelize, reduce_loss  # noqa: E402
from squall.train.loop import area_weighted_mse  # noqa: E402

# As tests/parallel/test_sharded_model.py: fp32 sums of a few thousand terms in another order
# differ by ~1e-6 of the largest gradient entry.
GRAD_RTOL = 2e-5


def _model(g):
    model = make_model(g, trainable_edge_features=2)
    torch.manual_seed(1)
    model.obs_encoder = ObservationEncoder(g.nodes["hidden"], 2, 12, 3, 2)
    return model


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 544, 5, generator=gen)
    y = torch.randn(2, 544, 4, generator=gen)
    rng = np.random.default_rng(0)
    parts = []
    for n in (400, 0):
        mask = torch.from_numpy(rng.random((n, 2)) >= 0.3)
        values = torch.from_numpy(rng.standard_normal((n, 2)).astype(np.float32))
        parts.append((torch.from_numpy(random_places(rng, n)), values, mask))
    return x, y, ObsBatch.pack(parts)


def _sharded(rank, world):
    g = tiny_graph()
    x, y, obs = _inputs()
    ref = _model(g)
    ref_out = ref(x, obs=obs)
    ref_loss = area_weighted_mse(ref_out, y, ref.graph.area)
    ref_loss.backward()
    model = parallelize(_model(g), g, ParallelConfig(world, "sfc"))
    ids = model.graph.data_ids_t
    out = model(model.runner.local_rows(x, dim=2), obs=obs)
    loss = area_weighted_mse(out, model.runner.local_rows(y), model.graph.area)
    loss.backward()
    # the rank's own observation edges: those of the whole graph ending at its mesh rows
    enc = model.obs_encoder
    local = enc.build_graph(obs, model.graph.mesh_ids)
    whole = enc.build_graph(obs)
    m = len(g.nodes["hidden"])
    deg = whole.index.colptr.diff().reshape(2, m)[:, model.graph.mesh_ids]
    assert torch.equal(local.index.colptr.diff().reshape(2, -1), deg)
    assert local.num_edges < whole.num_edges
    torch.testing.assert_close(out, ref_out[:, ids], rtol=1e-5, atol=1e-6)
    total = float(reduce_loss(loss, model.runner.groups))
    assert abs(total - float(ref_loss)) <= 1e-6 * float(ref_loss)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = grads[name].grad
        err = (p.grad - r).abs().max().item()
        assert err <= GRAD_RTOL * r.abs().max().item() + 1e-12, (name, err)
    assert any(name.startswith("obs_encoder.") for name, _ in model.named_parameters())


@pytest.mark.slow  # spawns 2 gloo ranks: ~30 s wall on 2 loaded cores
def test_sharded_observation_encoder_equals_the_unsharded_one():
    spawn(_sharded, 2)
