"""The decoder's grid destinations: ``latent`` (the data latent) or ``static`` (no state)."""

import pytest
import torch

from squall.errors import ConfigError
from squall.models.forecaster import GraphForecaster, ModelConfig

# 5 input columns: 3 prognostic (predicted as a residual), 2 forcings
RESIDUAL = [(0, 0), (1, 1), (2, 2)]


def make(graph, target):
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=24, num_heads=3, decoder_target=target)
    model = GraphForecaster(graph, cfg, num_input_vars=5, num_output_vars=4, input_steps=2,
                            residual_map=RESIDUAL)  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.1)  # zero at start: give the path an output
    return model


def change_without_mesh(model, x, shifted):
    """Change of the predicted tendency (output less the residual) when the inputs change from
    ``x`` to ``shifted`` and the decoder is fed one constant mesh latent: what reaches the output
    around the mesh."""
    hook = model.decoder.register_forward_pre_hook(
        lambda m, a: (torch.ones_like(a[0]), *a[1:]))  # fmt: skip
    try:
        with torch.no_grad():
            a, b = model(x), model(shifted)
    finally:
        hook.remove()
    res = [o for o, _ in RESIDUAL]
    a[..., res] -= x[:, -1, :, :3]
    b[..., res] -= shifted[:, -1, :, :3]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("target", ["latent", "static"])
def test_the_state_reaches_the_output_around_the_mesh_only_with_the_latent_target(
        tiny_graph, target):  # fmt: skip
    model = make(tiny_graph, target)
    x = torch.randn(1, 2, 544, 5)
    shifted = x.clone()
    shifted[..., :3] += 1.0  # every prognostic input, both steps
    moved = change_without_mesh(model, x, shifted)
    if target == "latent":
        assert moved > 1e-2
    else:  # fp32 round-off of the same sums: a few ulps of the O(1) outputs
        assert moved < 64 * torch.finfo(torch.float32).eps
    forcing = x.clone()
    forcing[:, -1, :, 3:] += 1.0  # the forcings reach the static destinations directly
    assert change_without_mesh(model, x, forcing) > 1e-2


def test_static_target_trains_through_the_mesh(tiny_graph):
    model = make(tiny_graph, "static")
    x = torch.randn(2, 2, 544, 5)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert model.static_in.tolist() == [3, 4]
    assert model.identity()["model"]["decoder_target"] == "static"
    assert "decoder_target" not in make(tiny_graph, "latent").identity()["model"]


def test_static_target_counts_its_embedding_flops(tiny_graph):
    latent, static = make(tiny_graph, "latent"), make(tiny_graph, "static")
    extra = 2 * static.embed_target.in_features * 24 * 544
    assert static.flops_per_sample() - latent.flops_per_sample() == extra


def test_unknown_decoder_target():
    with pytest.raises(ConfigError, match="decoder_target='grid'"):
        ModelConfig(decoder_target="grid")
