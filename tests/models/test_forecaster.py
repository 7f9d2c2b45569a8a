import numpy as np
import pytest
import torch

from squall.errors import ConfigError
from squall.graphs import build_graph
from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups


def make(graph, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=kw.pop("channels", 24), num_heads=kw.pop("heads", 3), **kw)
    return GraphForecaster(graph, cfg, num_input_vars=5, num_output_vars=4, input_steps=2,
                           residual_map=[(0, 0), (1, 1), (2, 2)])  # fmt: skip


def run_as_configured(model, graph):
    """The model with its checkpoint policies and compile applied, as every run applies them."""
    return parallelize(model, graph, ParallelConfig(), single_process_groups())


def test_shapes_and_every_parameter_gets_a_gradient(tiny_graph):
    model = make(tiny_graph, trainable_edge_features=2)
    nn_init_nonzero(model)
    x = torch.randn(2, 2, 544, 5)
    y = model(x)
    assert y.shape == (2, 544, 4)
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


def nn_init_nonzero(model):
    # the output head starts at zero (persistence); give it weights so gradients reach everything
    torch.nn.init.normal_(model.head.weight, std=0.1)


def test_starts_as_persistence(tiny_graph):
    model = make(tiny_graph)
    x = torch.randn(1, 2, 544, 5)
    y = model(x)
    assert torch.equal(y[..., :3], x[:, -1, :, :3]) and torch.equal(y[..., 3], torch.zeros(1, 544))


def test_batch_equals_single_samples(tiny_graph):
    model = make(tiny_graph)
    nn_init_nonzero(model)
    x = torch.randn(3, 2, 544, 5)
    together = model(x)
    for b in range(3):
        assert torch.allclose(together[b], model(x[b : b + 1])[0], atol=1e-6)


def test_permuting_grid_nodes_permutes_the_output(o8_latlon_deg, tiny_spec):
    lat, lon = o8_latlon_deg[:, 0], o8_latlon_deg[:, 1]
    perm = np.random.default_rng(0).permutation(len(lat))
    g0 = build_graph(tiny_spec(lat, lon))
    g1 = build_graph(tiny_spec(lat[perm], lon[perm]))
    m0, m1 = make(g0), make(g1)
    nn_init_nonzero(m0)
    m1.load_state_dict(m0.state_dict())
    x = torch.randn(1, 2, len(lat), 5)
    y0, y1 = m0(x), m1(x[:, :, perm])
    assert torch.allclose(y0[:, perm], y1, atol=1e-5)


@pytest.mark.parametrize("encoder, processor, decoder", [
    (True, True, True),
    ("mlp", "mlp", "mlp"),
    ("full", ("mlp", "none", "full"), "mlp"),
])  # fmt: skip
def test_checkpointing_gives_identical_outputs_and_gradients(
    tiny_graph, encoder, processor, decoder
):
    x = torch.randn(1, 2, 544, 5)
    outs, grads = [], []
    for policies in [("none", "none", "none"), (encoder, processor, decoder)]:
        model = make(tiny_graph, processor_layers=3, checkpoint_encoder=policies[0],
                     checkpoint_processor=policies[1], checkpoint_decoder=policies[2])  # fmt: skip
        run_as_configured(model, tiny_graph)
        nn_init_nonzero(model)
        y = model(x)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def saved_bytes(model, x) -> int:
    """Bytes the forward keeps for backward (checkpointed regions keep only their inputs)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_each_policy_keeps_less_for_backward(tiny_graph):
    x = torch.randn(1, 2, 544, 5)
    kept = {}
    for policy in ("none", "mlp", "full"):
        model = make(tiny_graph, processor_layers=3, checkpoint_encoder=policy,
                     checkpoint_processor=policy, checkpoint_decoder=policy)  # fmt: skip
        # the model alone is single-device code: its policies take effect through parallelize
        if policy == "full":
            plain = saved_bytes(model, x)
        kept[policy] = saved_bytes(run_as_configured(model, tiny_graph), x)
    assert plain == kept["none"]
    assert kept["none"] > kept["mlp"] > kept["full"], kept
    mixed = make(tiny_graph, processor_layers=3, checkpoint_processor=("mlp", "none", "full"))
    assert kept["full"] < saved_bytes(run_as_configured(mixed, tiny_graph), x) < kept["none"]


def test_checkpoint_policies_are_checked(tiny_graph):
    with pytest.raises(ConfigError, match="checkpoint.encoder: 'some'"):
        ModelConfig(checkpoint_encoder="some")
    with pytest.raises(ValueError, match="lists 1 policies for 2 processor layers"):
        ModelConfig(processor_layers=2, checkpoint_processor=("mlp",))
    cfg = ModelConfig(processor_layers=2, checkpoint_processor=["mlp", True])
    assert cfg.checkpoint_processor == ("mlp", "full") and cfg.checkpoint_encoder == "none"
    model = make(tiny_graph, processor_layers=2, checkpoint_processor=("mlp", True))
    run_as_configured(model, tiny_graph)
    assert [b in model.runner.recompute for b in model.processor] == [False, True]
    assert [b.recompute_mlp for b in model.processor] == [True, False]


def test_bad_input_shape(tiny_graph):
    with pytest.raises(ValueError, match="expected 2 steps on 544 grid points"):
        make(tiny_graph)(torch.randn(1, 2, 500, 5))


def test_heads_must_divide_channels(tiny_graph):
    with pytest.raises(ValueError, match="divisible"):
        make(tiny_graph, channels=25, heads=3)


def test_flops_match_a_count_of_the_executed_matrix_products(tiny_graph):
    """The analytic count against torch's FLOP counter on the torch backend: every matrix product
    it runs, plus the attention's elementwise work the counter does not see (q.(k+e), a*(v+e) and
    two edge additions: 6 C per edge and block)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = 24
    model = make(tiny_graph, channels=c, trainable_edge_features=2, processor_layers=3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 2, 544, 5))
    edges = {name: e.num_edges for name, e in tiny_graph.edges.items()}
    elementwise = 6 * c * (edges["encoder"] + 3 * edges["processor"] + edges["decoder"])
    assert model.flops_per_sample() == counter.get_total_flops() + elementwise


def test_parameter_count_by_hand(tiny_graph):
    """Every weight of the documented architecture, counted from its shapes (C channels, MLP
    ratio r, node attributes n_a, edge attributes d_e + trainable t)."""
    c, r, layers, t = 24, 2, 2, 2
    model = make(tiny_graph, channels=c, mlp_ratio=r, processor_layers=layers,
                 trainable_edge_features=t)  # fmt: skip
    n_a = tiny_graph.node_attributes("data").shape[1]
    edge_dim = {k: e.attrs.shape[1] + t for k, e in tiny_graph.edges.items()}
    norm, mlp = 2 * c, (c * r * c + r * c) + (r * c * c + c)
    common = norm + (c * c + c) + norm + mlp  # dst norm, out projection, MLP norm, MLP

    def block(role, bipartite):
        qkv = (c * c + c) + (2 * c * c + 2 * c) + norm if bipartite else 3 * c * c + 3 * c
        return common + qkv + edge_dim[role] * c + c  # edge projection and bias

    embed = (2 * 5 + n_a) * c + c + n_a * c + c  # two steps of 5 variables, node attributes
    trainable = t * sum(e.num_edges for e in tiny_graph.edges.values())
    head = norm + c * 4 + 4
    expected = (embed + trainable + block("encoder", True) + layers * block("processor", False)
                + block("decoder", True) + head)  # fmt: skip
    assert model.num_parameters() == expected


def test_tiny_model_overfits_a_tiny_dataset(tiny_graph):
    torch.manual_seed(1)
    model = make(tiny_graph, channels=32, heads=4)
    # a smooth target: a function of position and the input the model must learn
    lat = torch.from_numpy(tiny_graph.nodes["data"].latlon[:, 0]).float()
    x = torch.randn(2, 2, 544, 5) * 0.1 + torch.sin(3 * lat)[None, None, :, None]
    target = x[:, -1, :, :4] + 0.5 * torch.cos(2 * lat)[None, :, None] * x[:, 0, :, 1:5]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        loss = (model(x) - target).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


@pytest.mark.slow  # 54 s on 2 cores: inductor compiles C++ for every block
def test_compiled_blocks_match_eager(tiny_graph):
    from squall.models.forecaster import compile_blocks

    model = make(tiny_graph, processor_layers=1)
    nn_init_nonzero(model)
    x = torch.randn(1, 2, 544, 5)
    eager = model(x)
    keys = set(model.state_dict())
    compile_blocks(model)
    assert set(model.state_dict()) == keys, "checkpoints stay loadable"
    compiled = model(x)
    assert torch.allclose(compiled, eager, atol=1e-5)
    compiled.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
