"""The peak-memory estimate against tensors counted on CPU (squall.planning.memory)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from squall.models.forecaster import GraphForecaster, ModelConfig
from squall.planning import memory
from squall.planning.estimate import ModelSizes, _block_bytes, step_phases
from squall.planning.scaling import whole_graph_sizes


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("bipartite", [True, False])
def test_a_blocks_kept_tensors_are_the_estimates_units(autocast, bipartite):
    """Every byte one block keeps for its backward (Triton attention's saved set, bf16 autocast
    or fp32), per destination row, source row and edge, is the estimate's: nothing more, nothing
    less (``none``: everything; ``mlp``: less what the MLP recomputes)."""
    c, heads, ratio, n_dst, n_src, degree, e_dim = 32, 4, 2, 150, 233, 3, 11
    act = 2 if autocast else 4
    mcfg = ModelConfig(num_channels=c, num_heads=heads, processor_layers=1, mlp_ratio=ratio,
                       attention_backend="triton")  # fmt: skip
    n_src_rows = n_src if bipartite else n_dst
    kept, mlp, _ = _block_bytes(mcfg, 1, act, n_dst, n_src_rows, n_dst * degree, bipartite,
                                e_dim, autocast)  # fmt: skip
    for policy, expected in (("none", kept), ("mlp", kept - mlp)):
        got = memory.count_block(c, heads, ratio, n_dst, n_src, degree, e_dim, bipartite,
                                 autocast, policy)  # fmt: skip
        counted = (got["dst"] * n_dst * c + got["src"] * n_src_rows * c
                   + got["edge"] * n_dst * degree)  # fmt: skip
        assert counted == expected, (policy, got)
        # a block that keeps its attention keeps the bf16 copies of its weights with it
        assert (got["weights"] > 0) == autocast


@pytest.mark.parametrize("autocast", [False, True])
def test_what_a_step_keeps_after_its_forward_is_the_estimates(small_graph, autocast):
    """A whole model's step (fp32, or bf16 autocast with layer norms as CUDA runs them; the
    Triton attention's saved set; every checkpoint policy): the bytes alive after the forward,
    counted tensor by tensor, against the estimate's kept tensors (the inputs of the blocks that
    keep them, their inner activations where kept, the output layer norm's, the head's and the
    loss's)."""
    mcfg = ModelConfig(num_channels=32, num_heads=4, processor_layers=2, mlp_ratio=2,
                       trainable_edge_features=4, attention_backend="triton",
                       checkpoint_encoder="full", checkpoint_processor=("mlp", "none"),
                       checkpoint_decoder="none")  # fmt: skip
    from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups
    from squall.train.loop import area_weighted_mse

    torch.manual_seed(0)
    model = GraphForecaster(small_graph, mcfg, 5, 5, 2)
    model = parallelize(model, small_graph, ParallelConfig(), single_process_groups())
    n = model.graph.num_data
    x, y = torch.randn(1, 2, n, 5), torch.randn(1, n, 5)
    import squall.layers.graph_transformer as gt

    plain = gt.gt_attention_fused
    gt.gt_attention_fused = lambda q, k, v, a, w, b, idx, backend: memory._SavesAsTriton.apply(
        q, k, v, a, w, b, idx
    )

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return area_weighted_mse(model(x), y, model.graph.area)

    norms = memory.cuda_autocast_norms() if autocast else contextlib.nullcontext()
    try:
        with norms:
            totals, _ = memory.count_step(forward)
    finally:
        gt.gt_attention_fused = plain
    rows, edges = whole_graph_sizes(small_graph)
    sizes = ModelSizes.of(model, small_graph)
    phases = step_phases(mcfg, 1, rows, edges, 2 if autocast else 4, 1, sizes)
    # counted after autocast's exit freed its cache of bf16 weights (the recomputed encoder's
    # and those outside the blocks; the kept blocks' copies stay, saved for their backward)
    cache = 2 * (sizes.cast["encoder"] + sizes.cast_rest) if autocast else 0
    # what the estimate leaves out is the loss's scalar tensors and the area weights'
    # broadcast: a few kB, under 1 %
    assert phases["forward"] - cache == pytest.approx(totals["held_bytes"], rel=0.01)
    # the peak is in the decoder's backward: every kept tensor but the head's, the decoder's
    # transient, the head's and the decoder's gradients only
    assert max(phases, key=phases.get) == "backward decoder"
    assert phases["optimizer"] == 4 * sum(p.numel() for p in model.parameters())
