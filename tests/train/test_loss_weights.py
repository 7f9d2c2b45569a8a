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


def test_trainer_weighs_its_loss_by_the_models_tendency_spread():
    from types import SimpleNamespace

    from squall.graphs import build_graph
    from squall.models.forecaster import GraphForecaster, ModelConfig
    from squall.tracking import NullLogger
    from squall.train.loop import Trainer, VariableLayout
    from tests.models.conftest import tiny_spec

    tiny_graph = build_graph(tiny_spec())
    layout = VariableLayout.from_roles({"prognostic": [0, 1], "forcing": [2], "diagnostic": [3]})
    spread = [0.1, 2.0]
    model = GraphForecaster(tiny_graph, ModelConfig(num_channels=8, num_heads=2),
                            len(layout.inputs), len(layout.outputs), 2, layout.residual,
                            spread)  # fmt: skip
    base = dict(lr=1e-3, weight_decay=0.0, warmup_steps=0, max_steps=1, min_lr_ratio=1.0,
                precision="fp32", grad_clip=1.0)  # fmt: skip
    plain = Trainer(model, layout, SimpleNamespace(**base), torch.device("cpu"), NullLogger())
    weighted = Trainer(model, layout, SimpleNamespace(**base, loss_weights="tendency"),
                       torch.device("cpu"), NullLogger())  # fmt: skip
    assert plain.var_weight is None
    inverse = torch.tensor([100.0, 0.25, 1.0])  # 1 / spread^2, and 1 for the diagnostic
    torch.testing.assert_close(weighted.var_weight, inverse / inverse.mean())
    # persistence (the untrained model) errs by the data's change: the weighted loss counts each
    # prognostic variable's change in units of its spread
    g = model.graph.num_data
    x = torch.zeros(1, 2, g, 4)
    y = torch.zeros(1, 1, g, 4)
    y[..., 0], y[..., 1] = 0.1, 2.0  # one spread of change each; the diagnostic right (0)
    batch = {"x": x, "y": y}
    area = model.graph.area / model.graph.area.mean()
    expected = area_weighted_mse(y[:, 0, :, :3], torch.zeros(1, g, 3), area, weighted.var_weight)
    torch.testing.assert_close(weighted.rollout_loss(batch), expected)
    torch.testing.assert_close(weighted.rollout_loss(batch),
                               2 * inverse.mean().reciprocal() / 3)  # fmt: skip
