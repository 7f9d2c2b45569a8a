"""The generator's stochastic part: shocks of the documented spread, separable realisations."""

from __future__ import annotations

import numpy as np
import pytest

from squall.data.synthetic import Synthetic, SyntheticSettings
from squall.errors import DataError
from squall.graphs.grids import grid_from_name

LINEAR = ("z_500", "msl", "u_850", "v_850", "10u", "10v", "t_850", "2t")
VARIABLES = LINEAR + ("tp", "lsm")


@pytest.fixture(scope="module")
def grid():
    return grid_from_name("O16")


def settings(**kw) -> SyntheticSettings:
    return SyntheticSettings(num_times=400, seed=7, variables=VARIABLES, block=64, **kw)


def test_shocks_have_the_documented_spread(grid):
    rho = 0.6
    noisy = Synthetic(grid, settings(noise=0.3, noise_memory=rho))
    calm = Synthetic(grid, settings(noise=0.0, noise_memory=rho))
    times = np.arange(400)
    x, d = noisy.fields(times), calm.fields(times)
    expected = noisy.shock_std()
    assert sorted(expected) == sorted(LINEAR)  # tp is not linear in the noise
    for name in LINEAR:
        anomaly = x[name] - d[name]
        shock = anomaly[1:] - rho * anomaly[:-1]
        measured = shock.std(axis=0)
        # 399 shocks per point: the sample std is within ~3.5 % of the true one (1/sqrt(2n)); the
        # mean ratio over points is much tighter, the worst point gets 5 standard errors.
        ratio = measured / expected[name]
        valid = expected[name] > 1e-6 * expected[name].max()  # v at the poles, u where basis flat
        assert abs(ratio[valid].mean() - 1) < 0.03, name
        assert np.abs(ratio[valid] - 1).max() < 5 / np.sqrt(2 * 399), name


def test_noise_seed_changes_only_the_noise(grid):
    times = np.arange(0, 400, 40)
    base = Synthetic(grid, settings(noise=0.3)).fields(times)
    other = Synthetic(grid, settings(noise=0.3, noise_seed=11)).fields(times)
    calm = Synthetic(grid, settings(noise=0.0, noise_seed=11)).fields(times)
    calm_default = Synthetic(grid, settings(noise=0.0)).fields(times)
    assert not np.allclose(base["z_500"], other["z_500"])
    for name in VARIABLES:  # same blobs and land: equal once the noise is off
        np.testing.assert_array_equal(calm[name], calm_default[name])
    np.testing.assert_array_equal(base["lsm"], other["lsm"])


@pytest.mark.parametrize("kw", [{"noise_memory": 1.0}, {"noise_memory": -0.1}, {"noise": -1.0}])
def test_bad_noise_settings_are_refused(grid, kw):
    with pytest.raises(DataError, match="noise must be >= 0 and noise_memory in"):
        Synthetic(grid, settings(**kw))
