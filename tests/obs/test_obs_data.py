"""Synthetic observations: deterministic per seed and time, counts in range (0 included), the
inverse-distance interpolation against a brute-force one, noise, missing channels, packing, and
windows that draw the same observations from a rank's rows as from the whole grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from squall.data.observations import (
    ObsBatch,
    ObservationSampler,
    ObservationSettings,
    ObservationWindows,
    collate,
)
from squall.data.synthetic import SyntheticSettings, generate
from squall.data.zarr_dataset import make_dataloader
from squall.errors import DataError
from squall.graphs.grids import grid_from_name, latlon_to_xyz

CHANNELS = ("z_500", "2t", "msl")


@pytest.fixture(scope="module")
def grid():
    return grid_from_name("O16")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, grid):
    """12 six-hourly times on O16 (1,600 points)."""
    path = tmp_path_factory.mktemp("obs") / "o16.zarr"
    return generate(path, grid, SyntheticSettings(num_times=12, seed=5, block=12), grid_name="O16")


def _idw(grid_latlon, fields, places, k):
    """Brute-force inverse squared distance over the k nearest grid points (ties by index)."""
    g, p = latlon_to_xyz(grid_latlon), latlon_to_xyz(places)
    d2 = ((p[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    w = 1.0 / np.take_along_axis(d2, idx, 1)
    return np.einsum("nk,nkc->nc", w / w.sum(1, keepdims=True), fields[idx])


def test_draws_are_deterministic_per_seed_and_time_and_interpolate(grid):
    rng = np.random.default_rng(0)
    fields = rng.standard_normal((len(grid), len(CHANNELS))).astype(np.float32)
    s = ObservationSettings(CHANNELS, count_min=50, count_max=400, noise=0.0, missing=0.0)
    sampler = ObservationSampler(s, grid.latlon)
    a, b = sampler.draw(7, fields), sampler.draw(7, fields)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    other_time = sampler.draw(8, fields)
    other_seed = ObservationSampler(ObservationSettings(CHANNELS, 50, 400, seed=1), grid.latlon)
    assert not torch.equal(a[0][:10], other_time[0][:10])
    assert not torch.equal(a[0][:10], other_seed.draw(7, fields)[0][:10])
    latlon, values, mask = a
    assert 50 <= len(latlon) <= 400 and mask.all()
    assert latlon[:, 1].min() >= 0 and latlon[:, 1].max() < 2 * np.pi
    ref = _idw(grid.latlon, fields.astype(np.float64), latlon.numpy(), 3)
    # float64 weights and sums, stored as float32: one float32 rounding of values of size ~3
    np.testing.assert_allclose(values.numpy(), ref, rtol=0, atol=4 * np.finfo(np.float32).eps * 4)


def test_noise_and_missing_channels(grid):
    fields = np.full((len(grid), len(CHANNELS)), 0.5, dtype=np.float32)
    noisy = ObservationSettings(CHANNELS, count_min=4000, count_max=4000, noise=0.3,
                                missing=0.25)  # fmt: skip
    latlon, values, mask = ObservationSampler(noisy, grid.latlon).draw(3, fields)
    assert torch.isnan(values[~mask]).all() and torch.isfinite(values[mask]).all()
    # bounds at 5 standard errors: 12,000 Bernoulli(0.75) draws (0.004); the mean (0.3 /
    # sqrt(9,000) = 0.0032) and standard deviation (0.3 / sqrt(18,000) = 0.0022) of the noise
    assert abs(float(mask.float().mean()) - 0.75) < 0.02
    err = values[mask].double() - 0.5
    assert abs(float(err.mean())) < 0.016
    assert abs(float(err.std()) - 0.3) < 0.011
    every_missing = ObservationSettings(CHANNELS, count_min=5, count_max=5, missing=1.0)
    _, values, mask = ObservationSampler(every_missing, grid.latlon).draw(3, fields)
    assert not mask.any() and torch.isnan(values).all()
    none = ObservationSettings(CHANNELS, count_min=0, count_max=0)
    latlon, values, mask = ObservationSampler(none, grid.latlon).draw(3, fields)
    assert latlon.shape == (0, 2) and values.shape == (0, 3) and mask.shape == (0, 3)


def test_pack_and_collate_offsets():
    def obs(n):
        return (torch.rand(n, 2, dtype=torch.float64), torch.full((n, 2), float(n)),
                torch.ones(n, 2, dtype=torch.bool))  # fmt: skip

    samples = [{"x": torch.zeros(2, 3), "index": i, "obs": [obs(n), obs(2 * n)]}
               for i, n in enumerate([0, 1, 5])]  # fmt: skip
    batch = collate(samples)
    assert batch["x"].shape == (3, 2, 3) and batch["index"].tolist() == [0, 1, 2]
    first, second = batch["obs"]
    assert first.offsets.tolist() == [0, 0, 1, 6] and second.offsets.tolist() == [0, 0, 2, 12]
    for b, n in enumerate([0, 1, 5]):
        assert torch.equal(first.sample(b)[1], torch.full((n, 2), float(n)))
    pinned = first.pin_memory() if torch.cuda.is_available() else first
    assert isinstance(pinned, ObsBatch)
    with pytest.raises(DataError, match="empty batch"):
        ObsBatch.pack([])


def test_settings_errors_are_one_line():
    with pytest.raises(DataError, match="count"):
        ObservationSettings.from_cfg({"channels": ["2t"], "count": [5, 2]})
    with pytest.raises(DataError, match="unknown keys"):
        ObservationSettings.from_cfg({"channels": ["2t"], "cout": [0, 1]})
    with pytest.raises(DataError, match="at least one"):
        ObservationSettings.from_cfg({"channels": []})


def test_windows_draw_the_same_observations_from_a_rank_rows(dataset):
    s = ObservationSettings(CHANNELS, count_min=0, count_max=100, noise=0.0, missing=0.3)
    full = ObservationWindows(dataset, input_steps=2, rollout=2, observations=s)
    rows = np.arange(0, 1600, 3)
    part = ObservationWindows(dataset, input_steps=2, rollout=2, observations=s,
                              grid_indices=rows)  # fmt: skip
    a, b = full[3], part[3]
    assert len(a["obs"]) == 2 and b["x"].shape[1] == len(rows)
    for (la, va, ma), (lb, vb, mb) in zip(a["obs"], b["obs"], strict=True):
        assert torch.equal(la, lb) and torch.equal(ma, mb)
        # the same fields read two ways, normalised alike: equal to float32 rounding
        torch.testing.assert_close(va, vb, equal_nan=True, rtol=2e-6, atol=2e-6)
    # one time, two windows: window 3's second step is window 4's first
    assert torch.equal(a["obs"][1][0], full[4]["obs"][0][0])
    # values come from the state each step starts from (noise 0: the interpolated field)
    la, va, ma = a["obs"][0]
    cols = [full.variables.index(c) for c in CHANNELS]
    grid_latlon = np.deg2rad(np.stack([full.info.latitudes, full.info.longitudes], 1))
    ref = _idw(grid_latlon, a["x"][-1][:, cols].double().numpy(), la.numpy(), 3)
    np.testing.assert_allclose(va[ma].numpy(), ref[ma.numpy()], atol=1e-5)
    loader = make_dataloader(full, batch_size=2)
    batch = next(iter(loader))
    assert batch["obs"][0].num_samples == 2 and batch["x"].shape[0] == 2
    with pytest.raises(DataError, match="not among"):
        ObservationWindows(dataset, observations=ObservationSettings(("nope",)))
