"""The stochastic (ensemble) forecaster: noise on the mesh conditions the processor."""

import pytest
import torch

from squall.errors import ConfigError
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups

NOISE = 5  # not a power of two, not a multiple of the heads
MESH = 162  # level-2 icosahedral mesh of tiny_graph
GRID = 544  # O8


def make(graph, noise=NOISE, members=1, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=24, num_heads=3, noise_channels=noise,
                      ensemble_members=members, **kw)  # fmt: skip
    return GraphForecaster(graph, cfg, num_input_vars=5, num_output_vars=4, input_steps=2,
                           residual_map=[(0, 0), (1, 1), (2, 2)])  # fmt: skip


def wake(model, seed=1):
    """Non-zero weights where a fresh model has zeros (output head, noise conditioning), so the
    noise reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    for name, p in model.named_parameters():
        if ".noise." in name:
            with torch.no_grad():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_deterministic_model_has_no_noise_and_refuses_it(tiny_graph):
    model = make(tiny_graph, noise=0)
    assert not any(".noise." in name for name, _ in model.named_parameters())
    assert "noise_channels" not in model.cfg.architecture()
    with pytest.raises(ValueError, match="deterministic"):
        model(torch.randn(1, 2, GRID, 5), noise=torch.randn(1, MESH, 3))


def test_fresh_ensemble_model_is_the_deterministic_one(tiny_graph):
    """The conditioning starts at zero: whatever the noise, a fresh ensemble model with the
    deterministic model's weights gives its outputs (the same operations on the same values, up
    to the rounding of matrix products on sliced, non-contiguous rows)."""
    det = make(tiny_graph, noise=0)
    torch.nn.init.normal_(det.head.weight, std=0.1)
    ens = make(tiny_graph)
    missing, unexpected = ens.load_state_dict(det.state_dict(), strict=False)
    assert not unexpected and missing and all(".noise." in k for k in missing)
    x = torch.randn(2, 2, GRID, 5)
    want = det(x)
    got = ens(x, noise=10 * torch.randn(2, MESH, NOISE))
    tol = 64 * torch.finfo(torch.float32).eps * want.abs().max()  # a few roundings per layer
    assert (got - want).abs().max() <= tol


def test_members_differ_only_by_their_noise(tiny_graph):
    model = wake(make(tiny_graph))
    x = torch.randn(1, 2, GRID, 5).expand(4, -1, -1, -1)
    noise = torch.randn(4, MESH, NOISE)
    noise[1] = noise[0]  # members 0 and 1 share their noise
    y = model(x, noise=noise)
    scale = y.abs().max()
    eps = torch.finfo(torch.float32).eps
    assert (y[0] - y[1]).abs().max() <= 16 * eps * scale
    for j, k in ((0, 2), (0, 3), (2, 3)):  # other noise: another forecast
        assert (y[j] - y[k]).abs().max() > 1e-3 * scale
    # a member does not depend on the others in the folded batch
    alone = model(x[2:3], noise=noise[2:3])
    assert (alone[0] - y[2]).abs().max() <= 16 * eps * scale


def test_noise_is_drawn_per_call(tiny_graph):
    model = wake(make(tiny_graph))
    x = torch.randn(1, 2, GRID, 5)
    torch.manual_seed(3)
    a, b = model(x), model(x)
    torch.manual_seed(3)
    assert torch.equal(model(x), a) and not torch.equal(a, b)


def test_every_parameter_gets_a_gradient_and_noise_is_checked(tiny_graph):
    model = wake(make(tiny_graph, trainable_edge_features=2))
    y = model(torch.randn(2, 2, GRID, 5))
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    with pytest.raises(ValueError, match="noise of shape"):
        model(torch.randn(2, 2, GRID, 5), noise=torch.randn(2, MESH, NOISE + 1))


@pytest.mark.parametrize("policy", ["mlp", "full"])
def test_checkpointing_keeps_outputs_and_gradients(tiny_graph, policy):
    x, noise = torch.randn(2, 2, GRID, 5), torch.randn(2, MESH, NOISE)
    outs, grads = [], []
    for proc in ("none", policy):
        model = wake(make(tiny_graph, checkpoint_processor=proc))
        parallelize(model, tiny_graph, ParallelConfig(), single_process_groups())
        y = model(x, noise=noise)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def test_flops_count_the_conditioning(tiny_graph):
    det, ens = make(tiny_graph, noise=0), make(tiny_graph)
    layer = ens.processor[0].noise.net
    per_node = 2 * (layer[0].in_features * layer[0].out_features
                    + layer[2].in_features * layer[2].out_features)  # fmt: skip
    extra = ens.flops_per_sample() - det.flops_per_sample()
    assert extra == per_node * MESH * len(ens.processor)


def test_config_errors():
    with pytest.raises(ConfigError, match="noise_channels > 0"):
        ModelConfig(ensemble_members=4)
    with pytest.raises(ConfigError, match="choose one of"):
        ModelConfig(noise_channels=4, ensemble_loss="mse")
    with pytest.raises(ConfigError, match="alpha"):
        ModelConfig(noise_channels=4, crps_alpha=1.5)
    assert ModelConfig(noise_channels=4).architecture()["noise_channels"] == 4
