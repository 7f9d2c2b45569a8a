"""The observation encoder: packed samples equal samples run alone, 0 / 1 / many observations,
missing channels never reach the model, a rank's mesh rows equal the whole mesh's, the model
with and without observations, and the configuration checks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from squall.data.observations import ObsBatch, random_places
from squall.errors import ConfigError
from squall.models.obs_encoder import ObservationEncoder, attach_observations
from squall.parallel.partition import partition_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_workers import make_model, tiny_graph  # noqa: E402

C_OBS = 3


def _obs(counts, seed=0, missing=0.3) -> ObsBatch:
    rng = np.random.default_rng(seed)
    parts = []
    for n in counts:
        values = torch.from_numpy(rng.standard_normal((n, C_OBS)).astype(np.float32))
        mask = torch.from_numpy(rng.random((n, C_OBS)) >= missing)
        values[~mask] = torch.nan
        parts.append((torch.from_numpy(random_places(rng, n)), values, mask))
    return ObsBatch.pack(parts)


def _encoder(graph, seed=0):
    torch.manual_seed(seed)
    # 12 channels, 3 heads: odd widths as in tests/parallel
    return ObservationEncoder(graph.nodes["hidden"], C_OBS, 12, 3, 2)


def test_packed_samples_equal_samples_alone_and_nan_never_leaks():
    g = tiny_graph()
    enc = _encoder(g)
    m = len(g.nodes["hidden"])
    counts = [0, 1, 700]
    obs = _obs(counts)
    z = torch.randn(len(counts), m, 12, requires_grad=True)
    out = enc(z, obs)
    assert out.shape == z.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())
    for b in range(len(counts)):
        alone = enc(z[b : b + 1], ObsBatch.pack([obs.sample(b)]))
        # the same rows through the same products (batch 1 vs 3 rows of one matrix): rounding
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-6)
    # no observation: every mesh row goes through the residual MLP alone (attention sums to 0)
    blk = enc.block
    x = z[:1] + blk.out.bias
    torch.testing.assert_close(out[:1], blk.mlp_residual(x), rtol=1e-5, atol=1e-6)
    # one observation reaches a few mesh nodes only; the others match the empty sample's rows
    touched = enc.build_graph(ObsBatch.pack([obs.sample(1)])).index.colptr.diff() > 0
    assert 0 < int(touched.sum()) < m
    untouched = blk.mlp_residual(z[1:2] + blk.out.bias)[0, ~touched]
    torch.testing.assert_close(out[1, ~touched], untouched, rtol=1e-5, atol=1e-6)


def test_missing_values_are_ignored_whatever_they_hold():
    g = tiny_graph()
    enc = _encoder(g)
    obs = _obs([300, 40], missing=0.5)
    z = torch.randn(2, len(g.nodes["hidden"]), 12)
    ref = enc(z, obs)
    scrambled = obs.values.clone()
    scrambled[~obs.mask] = torch.randn(int((~obs.mask).sum())) * 1e6
    same = enc(z, ObsBatch(obs.latlon, scrambled, obs.mask, obs.offsets))
    assert torch.equal(ref, same)
    # every channel missing: only place and mask reach the model, still finite
    none = ObsBatch(obs.latlon, torch.full_like(obs.values, torch.nan),
                    torch.zeros_like(obs.mask), obs.offsets)  # fmt: skip
    out = enc(z, none)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize("parts", [2, 3])
def test_a_rank_rows_equal_the_whole_mesh_rows(parts):
    """Each part's mesh rows (as a model-parallel rank holds them) through the encoder equal the
    whole mesh's rows: edges built for the part's nodes only are the whole graph's rows."""
    g = tiny_graph()
    enc = _encoder(g)
    obs = _obs([500, 0, 37], seed=4)
    z = torch.randn(3, len(g.nodes["hidden"]), 12)
    whole = enc(z, obs)
    whole_graph = enc.build_graph(obs)
    partition = partition_graph(g, parts, "sfc")
    for r in range(parts):
        ids = partition.owned("hidden", r)[::-1].copy()  # any row order
        part = enc(z[:, ids], obs, ids)
        torch.testing.assert_close(part, whole[:, ids], rtol=1e-5, atol=1e-6)
        local = enc.build_graph(obs, ids)
        m, k = len(g.nodes["hidden"]), len(ids)
        deg_whole = whole_graph.index.colptr.diff().reshape(3, m)[:, ids]
        assert torch.equal(local.index.colptr.diff().reshape(3, k), deg_whole)


def _cfg(model_obs, data_obs):
    return OmegaConf.create({"model": {"observations": model_obs},
                             "data": {"observations": data_obs}})  # fmt: skip


def test_model_with_observations_and_configuration_checks():
    g = tiny_graph()
    x = torch.randn(2, 2, len(g.nodes["data"]), 5)
    plain = make_model(g)
    model = attach_observations(make_model(g), _cfg({"cutoff_factor": 0.7},
                                                    {"channels": ["a", "b", "c"]}), g)  # fmt: skip
    assert model.obs_encoder.obs_channels == C_OBS
    # without observations the encoder is skipped: the plain model's output
    assert torch.equal(model(x), plain(x))
    out = model(x, obs=_obs([0, 50]))
    assert out.shape == plain(x).shape and not torch.equal(out, plain(x))
    with pytest.raises(ValueError, match="2 samples for a batch of 1"):
        model(x[:1], obs=_obs([0, 50]))
    with pytest.raises(ValueError, match="without an observation encoder"):
        plain(x, obs=_obs([1, 1]))
    with pytest.raises(ConfigError, match="data.observations is not"):
        attach_observations(make_model(g), _cfg({}, None), g)
    with pytest.raises(ConfigError, match="model.observations is not"):
        attach_observations(make_model(g), _cfg(None, {"channels": ["a"]}), g)
    assert attach_observations(plain, _cfg(None, None), g).obs_encoder is None


def test_trainer_feeds_each_rollout_step_its_observations():
    from squall.tracking.logger import NullLogger
    from squall.train.loop import Trainer, VariableLayout

    g = tiny_graph()
    model = attach_observations(make_model(g), _cfg({}, {"channels": ["a", "b", "c"]}), g)
    seen = []
    real = model.obs_encoder.forward
    model.obs_encoder.forward = lambda z, obs, ids=None: seen.append(obs) or real(z, obs, ids)
    layout = VariableLayout.from_roles({"prognostic": [0, 1, 2], "forcing": [3, 4],
                                        "diagnostic": [5]})  # fmt: skip
    cfg = OmegaConf.create({"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "max_steps": 2,
                            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 1.0})  # fmt: skip
    trainer = Trainer(model, layout, cfg, torch.device("cpu"), NullLogger())
    gen = torch.Generator().manual_seed(0)
    steps = [_obs([30, 0], seed=1), _obs([5, 60], seed=2)]
    batch = {"x": torch.randn(2, 2, 544, 6, generator=gen),
             "y": torch.randn(2, 2, 544, 6, generator=gen), "obs": steps}  # fmt: skip
    before = model.obs_encoder.embed.weight.detach().clone()
    loss, _ = trainer.train_step(batch)
    assert torch.isfinite(loss)
    assert [torch.equal(a.latlon, b.latlon) for a, b in zip(seen, steps, strict=True)] == [1, 1]
    assert not torch.equal(before, model.obs_encoder.embed.weight)
