"""``training.loss_weights``: the output variables weighed by their one-step change."""

import pytest
import torch

from squall.errors import ConfigError
from squall.train.loop import area_weighted_mse, variable_weights


def test_tendency_weights_are_the_inverse_change_variance_with_mean_one():
    scale = torch.tensor([0.1, 1.0, 0.5, 1.0])  # three prognostic changes, one diagnostic (1)
    w = variable_weights(scale, "tendency")
    inverse = torch.tensor([100.0, 1.0, 4.0, 1.0])
    torch.testing.assert_close(w, inverse / inverse.mean())
    assert variable_weights(scale, "state") is None


def test_each_variable_errs_by_its_own_change_under_tendency_weights():
    # an error of one tendency spread in one variable costs the same whichever variable it is
    scale = torch.tensor([0.05, 2.0])
    w = variable_weights(scale, "tendency")
    area = torch.ones(6)
    truth = torch.zeros(1, 6, 2)
    costs = []
    for v in range(2):
        pred = truth.clone()
        pred[..., v] = scale[v]
        costs.append(area_weighted_mse(pred, truth, area, w))
    torch.testing.assert_close(costs[0], costs[1])
    pred = truth + scale  # unweighted: the large-change variable fills the loss
    plain = area_weighted_mse(pred, truth, area)
    torch.testing.assert_close(plain, scale.square().mean())


def test_a_constant_variable_does_not_swamp_the_loss():
    w = variable_weights(torch.tensor([1e-9, 1.0]), "tendency")
    assert torch.isfinite(w).all() and w[0] / w[1] == pytest.approx(1e6)


def test_unknown_loss_weights():
    with pytest.raises(ConfigError, match="training.loss_weights='area'"):
        variable_weights(torch.ones(2), "area")
