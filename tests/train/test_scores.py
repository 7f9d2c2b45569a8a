"""Ensemble scores against brute force, the empirical CRPS integral and known expectations."""

import math

import numpy as np
import pytest
import torch

from squall.train.scores import afcrps, afcrps_pointwise, energy_score, fair_crps, spread_skill

FP32_EPS = torch.finfo(torch.float32).eps


def brute_afcrps(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """The O(M^2) double sum of the definition, in fp64; x [B, M, G, V], y [B, G, V]."""
    m = x.shape[1]
    eps = (1 - alpha) / m
    total = np.zeros(y.shape)
    for j in range(m):
        for k in range(m):
            if j != k:
                total += (np.abs(x[:, j] - y) + np.abs(x[:, k] - y)
                          - (1 - eps) * np.abs(x[:, j] - x[:, k]))
    return total / (2 * m * (m - 1))


def empirical_crps(members: np.ndarray, obs: float) -> float:
    """Integral of (F(z) - 1{z >= obs})^2 dz for the members' step CDF, summed piece by piece."""
    points = np.sort(np.append(members, obs))
    total = 0.0
    for left, right in zip(points[:-1], points[1:], strict=True):
        cdf = np.mean(members <= left)
        heaviside = 1.0 if left >= obs else 0.0
        total += (cdf - heaviside) ** 2 * (right - left)
    return total


def tolerance(reference: np.ndarray, members: int) -> float:
    # fp32 rounding of ~M^2 terms of the reference's size, with room for the sort-based reordering
    return 4 * FP32_EPS * members**2 * float(np.abs(reference).max() + 1)


@pytest.mark.parametrize("members", [2, 3, 4, 7, 16])
@pytest.mark.parametrize("alpha", [0.0, 0.95, 1.0])
def test_afcrps_equals_the_double_sum(members, alpha):
    g = torch.Generator().manual_seed(members)
    x = torch.randn(2, members, 33, 5, generator=g, dtype=torch.float64)
    x[:, 0, 0, 0] = x[:, 1, 0, 0]  # tied members
    y = torch.randn(2, 33, 5, generator=g, dtype=torch.float64)
    want = brute_afcrps(x.numpy(), y.numpy(), alpha)
    got = afcrps_pointwise(x.float(), y.float(), alpha).double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(want, members))


def test_alpha_zero_is_the_crps_of_the_empirical_distribution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 5, 40, 1))
    y = rng.normal(size=(1, 40, 1))
    got = afcrps_pointwise(torch.from_numpy(x).float(), torch.from_numpy(y).float(), 0.0)
    want = [empirical_crps(x[0, :, i, 0], y[0, i, 0]) for i in range(40)]
    np.testing.assert_allclose(got[0, :, 0].numpy(), want, rtol=0, atol=tolerance(np.array(want), 5))


def test_fair_crps_is_unbiased_and_the_empirical_crps_is_not():
    # Members and truth i.i.d. N(0, 1): E[CRPS(N(0,1), y)] = E|X - Y| - E|X - X'|/2 = 1/sqrt(pi).
    # The empirical CRPS of M members exceeds it by E|X - X'| / (2M) = 1 / (M sqrt(pi)).
    members, samples = 4, 200_000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, members, samples, 1, generator=g)
    y = torch.randn(1, samples, 1, generator=g)
    fair = afcrps_pointwise(x, y, 1.0).flatten().double()
    empirical = afcrps_pointwise(x, y, 0.0).flatten().double()
    truth = 1 / math.sqrt(math.pi)
    stderr = float(fair.std()) / math.sqrt(samples)
    assert abs(float(fair.mean()) - truth) < 5 * stderr
    bias = float(empirical.mean()) - truth
    assert abs(bias - truth / members) < 5 * stderr


def test_area_weighting_and_gradients_match_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 17, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 17, 3, generator=g, dtype=torch.float64)
    area = torch.rand(17, generator=g, dtype=torch.float64) + 0.5
    area = area / area.mean()

    xs = x.float().requires_grad_()
    afcrps(xs, y.float(), area.float(), alpha=0.95).backward()

    xb = x.clone().requires_grad_()
    m, eps = 4, 0.05 / 4
    pair = (xb.unsqueeze(1) - xb.unsqueeze(2)).abs().sum(dim=(1, 2))
    point = (xb - y.unsqueeze(1)).abs().mean(1) - (1 - eps) / (2 * m * (m - 1)) * pair
    (point * area[None, :, None]).mean().backward()
    np.testing.assert_allclose(xs.grad.double().numpy(), xb.grad.numpy(), rtol=0,
                               atol=8 * FP32_EPS * float(xb.grad.abs().max()))


def test_energy_score_on_one_point_is_the_fair_crps():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 1, 2, generator=g)
    y = torch.randn(3, 1, 2, generator=g)
    ones = torch.ones(1)
    assert torch.allclose(energy_score(x, y, ones), fair_crps(x, y, ones), rtol=0,
                          atol=36 * FP32_EPS)


def test_energy_score_prefers_the_true_spatial_correlation():
    # Truth and members are fields with the same marginals; only the ensemble whose members share
    # the truth's correlation across the grid (here: constant fields) scores better.
    g = torch.Generator().manual_seed(5)
    samples, members, points = 400, 8, 16
    truth = torch.randn(samples, 1, 1, generator=g).expand(samples, points, 1)
    correlated = torch.randn(samples, members, 1, 1, generator=g).expand(-1, -1, points, 1)
    independent = torch.randn(samples, members, points, 1, generator=g)
    area = torch.ones(points)
    assert energy_score(correlated, truth, area) < energy_score(independent, truth, area)
    # the CRPS sees only marginals and cannot tell them apart (within sampling noise)
    a, b = fair_crps(correlated, truth, area), fair_crps(independent, truth, area)
    assert abs(float(a - b)) < 0.1


def test_calibrated_ensemble_has_spread_skill_ratio_one():
    g = torch.Generator().manual_seed(6)
    members = 5
    signal = torch.randn(1000, 1, 20, 2, generator=g)
    x = signal + torch.randn(1000, members, 20, 2, generator=g)
    y = signal[:, 0] + torch.randn(1000, 20, 2, generator=g)
    ratio = spread_skill(x, y, torch.ones(20))["ratio"]
    assert torch.allclose(ratio, torch.ones(2), atol=0.03)
    under = spread_skill(signal + 0.5 * (x - signal), y, torch.ones(20))["ratio"]
    assert (under < 0.6).all()


@pytest.mark.parametrize("shapes, message", [
    (((2, 1, 3, 4), (2, 3, 4), (3,)), "at least 2 ensemble members"),
    (((2, 4, 3, 4), (2, 3, 5), (3,)), "does not match ensemble"),
    (((2, 4, 3, 4), (2, 3, 4), (4,)), "area must be"),
    (((4, 3, 4), (2, 3, 4), (3,)), "must be \\[B, M, G, V\\]"),
])
def test_bad_shapes_are_named(shapes, message):
    x, y, a = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        afcrps(x, y, a)


def test_alpha_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="alpha must lie in"):
        afcrps(torch.zeros(1, 2, 3, 1), torch.zeros(1, 3, 1), torch.ones(3), alpha=1.5)
