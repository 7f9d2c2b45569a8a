"""The sharded forecaster against the single-device one: forward bitwise equal (torch backend),
gradients equal to fp32 summation noise, overlap on/off and chunked/unchunked alike, model x data
parallel, uneven parts; its traffic counters and the planner's halo estimate against the bytes
the collectives actually moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from parallel_workers import make_model, spawn, tiny_graph

from squall.distributed.layout import Layout, build_groups
from squall.parallel.halo import build_halo_plans
from squall.parallel.parallelize import ParallelConfig, gather, parallelize, reduce_loss
from squall.parallel.partition import Partition
from squall.planning.estimate import estimate
from squall.tracking import metrics as M
from squall.train.loop import area_weighted_mse

# Relative to the largest gradient entry of each parameter: fp32 sums of a few thousand terms in
# another order differ by ~1e-6 of their magnitude here (1.3e-6 to 1.6e-6 measured at P = 2, 3).
GRAD_RTOL = 2e-5


def _data(seed: int, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 544, 5, generator=gen)
    y = torch.randn(batch, 544, 4, generator=gen)
    return x, y


def _reference(model_kw, xs_ys):
    """Single-device loss and gradients, averaged over the samples of ``xs_ys``."""
    g = tiny_graph()
    ref = make_model(g, **model_kw)
    outs, total = [], 0.0
    for x, y in xs_ys:
        out = ref(x)
        loss = area_weighted_mse(out, y, ref.graph.area) / len(xs_ys)
        loss.backward()
        outs.append(out.detach())
        total += float(loss.detach())
    return outs, total, {n: p.grad for n, p in ref.named_parameters()}


def _assert_grads_close(model, grads, what):
    for name, p in model.named_parameters():
        ref = grads[name]
        err = (p.grad - ref).abs().max().item()
        assert err <= GRAD_RTOL * ref.abs().max().item() + 1e-12, (what, name, err)


def _run(model, x, y):
    """Forward and backward of this rank's rows of full-grid ``x`` and ``y``."""
    local = model.runner.local_rows
    out = model(local(x, dim=2))
    loss = area_weighted_mse(out, local(y), model.graph.area)
    loss.backward()
    return out, loss


class _CountExchanges:
    """Counts what this process hands to ``all_to_all_single`` for other ranks (the halo
    exchange's only collective), forward and backward: the real call still runs."""

    def __init__(self):
        self.rows = self.bytes = 0

    def __enter__(self):
        self.real = dist.all_to_all_single

        def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                async_op=False):  # fmt: skip
            me = dist.get_rank(group)
            to_others = sum(input_split_sizes) - input_split_sizes[me]
            self.rows += to_others
            self.bytes += to_others * input.shape[1:].numel() * input.element_size()
            return self.real(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.all_to_all_single = spy
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.real


def _edge_imbalance(g, partition) -> float:
    """Max / mean edges per part, every edge set, each edge on its destination's owner (brute
    force over the edge lists)."""
    per_part = np.zeros(partition.num_parts)
    for e in g.edges.values():
        per_part += np.bincount(partition.owner[e.dst][e.dst_index], minlength=len(per_part))
    return float(per_part.max() / per_part.mean())


CONFIGS = [  # (parallel config overrides, model overrides)
    ({"overlap": True}, {"trainable_edge_features": 2, "checkpoint_processor": True}),
    ({"overlap": False}, {"trainable_edge_features": 2, "checkpoint_processor": True}),
    ({"chunks": 3}, {"trainable_edge_features": 2, "checkpoint_encoder": True}),
]


def _lopsided_partition(g):
    """P = 2: part 0 owns mesh node 0 and the grid points reading it; part 1 the rest, so part 1's
    decoder has no boundary destination but still sends mesh rows to part 0."""
    dec = g.edges["decoder"]
    reads_m0 = np.zeros(dec.num_dst, dtype=bool)
    reads_m0[dec.dst_index[dec.row == 0]] = True
    mesh = np.ones(dec.num_src, dtype=np.int32)
    mesh[0] = 0
    return Partition(
        2, "hand-made", {"hidden": mesh, "data": np.where(reads_m0, 0, 1).astype(np.int32)}
    )


def _model_parallel(rank, world, method, configs):
    g = tiny_graph()
    x, y = _data(0)
    if method == "lopsided":
        part = _lopsided_partition(g)
        plan = build_halo_plans(g.edges["decoder"], part)[1]
        assert plan.boundary.num_dst == 0 and plan.send_counts.sum() > 0
    for pkw, mkw in configs:
        (ref_out,), ref_loss, grads = _reference(mkw, [(x, y)])
        if method == "lopsided":
            pcfg = ParallelConfig(world, "sfc", **pkw)
            model = parallelize(make_model(g, **mkw), g, pcfg, partition=_lopsided_partition(g))
        else:
            pcfg = ParallelConfig(world, method, **pkw)
            model = parallelize(make_model(g, **mkw), g, pcfg)
        with _CountExchanges() as moved:
            out, loss = _run(model, x, y)
        ids = model.graph.data_ids_t
        if method == "lopsided":
            # a part of one mesh node makes 2-row matrix products, for which the CPU BLAS takes
            # another kernel (bitwise equal from 4 rows up, measured): equal to rounding only
            assert torch.allclose(out, ref_out[:, ids], rtol=1e-5, atol=1e-6), pkw
        else:
            assert torch.equal(out, ref_out[:, ids]), (pkw, "forward not bitwise equal")
        total = float(reduce_loss(loss, model.runner.groups))
        assert abs(total - ref_loss) <= 1e-6 * ref_loss, (total, ref_loss)
        _assert_grads_close(model, grads, pkw)
        # the runner's counters are the traffic the collectives carried
        stats = model.runner.parallel_metrics(steps=1)
        assert stats[M.HALO_ROWS_SENT] == moved.rows > 0
        assert stats[M.HALO_BYTES_PER_STEP] == moved.bytes
        assert stats[M.EDGE_IMBALANCE] == pytest.approx(
            _edge_imbalance(g, model.runner.partition), rel=1e-12
        )
        if method != "lopsided":
            # the planner's halo estimate (fp32 activations here) is the bytes the model group
            # moved, forward and backward, summed over its ranks
            _, ranks, _, _ = estimate(g, model.cfg, pcfg, world, batch=x.shape[0],
                                      num_vars=(5, 4), input_steps=2, act_bytes=4)  # fmt: skip
            sent = [None] * world
            dist.all_gather_object(sent, moved.bytes)
            assert sum(r.halo_bytes_per_step for r in ranks) == sum(sent), (ranks, sent)
        full = gather(model, out.detach())
        assert torch.equal(full[:, ids], out.detach())
        if method != "lopsided":
            assert torch.equal(full, ref_out)


def _model_x_data(rank, world):
    """world 4 = 2 model-parallel x 2 data-parallel; replica d trains on its own batch."""
    g = tiny_graph()
    layout = Layout(world, 2)
    groups = build_groups(layout)
    batches = [_data(10 + d, batch=1) for d in range(layout.data_parallel)]
    outs, ref_loss, grads = _reference({}, batches)
    model = parallelize(make_model(g), g, ParallelConfig(2, "sfc"), groups)
    assert model.runner.grad_reducer is not None
    x, y = batches[groups.data_rank]
    out, loss = _run(model, x, y)
    assert torch.equal(out, outs[groups.data_rank][:, model.graph.data_ids_t])
    # the reference averaged the replicas' losses and gradients: the parallel run must too
    total = float(reduce_loss(loss, groups))
    assert abs(total - ref_loss) <= 1e-6 * ref_loss, (total, ref_loss)
    _assert_grads_close(model, grads, "mp x dp")
    # one optimiser step keeps every rank's parameters identical
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], f) for f in gathered)


def test_one_part_and_chunks_equal_the_unsharded_model():
    g = tiny_graph()
    x, y = _data(0)
    (ref_out,), _, grads = _reference({"trainable_edge_features": 2}, [(x, y)])
    for chunks in (1, 4):
        model = parallelize(make_model(g, trainable_edge_features=2), g,
                            ParallelConfig(1, "sfc", chunks=chunks))  # fmt: skip
        assert type(model) is type(make_model(g)), "parallelize keeps the model's class"
        assert model.runner.sharded == (chunks > 1)
        out, _ = _run(model, x, y)
        assert torch.equal(out, ref_out), chunks
        _assert_grads_close(model, grads, f"chunks={chunks}")
        single = make_model(g, trainable_edge_features=2)
        assert model.flops_per_sample() == single.flops_per_sample()
        # checkpoints move between layouts: same keys, same tensors
        assert list(model.state_dict()) == list(single.state_dict())
        single.load_state_dict(model.state_dict())
        assert torch.equal(single(x), ref_out)
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model, g, ParallelConfig())


@pytest.mark.parametrize(
    ("world", "method", "configs"),
    [
        (2, "sfc", CONFIGS),
        (3, "ranges", CONFIGS[:1]),
        pytest.param(4, "sfc", CONFIGS[2:], marks=pytest.mark.slow),  # 13 s: four gloo ranks
        (2, "lopsided", CONFIGS[:1]),
    ],
)
def test_sharded_model_equals_the_unsharded_one(world, method, configs):
    spawn(_model_parallel, world, method, configs)


@pytest.mark.slow  # 12 s: four gloo ranks
def test_model_and_data_parallel_together():
    spawn(_model_x_data, 4)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs (outside any
    checkpointed region: a checkpoint keeps its inputs and recomputes the rest)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunks_keep_a_fraction_of_the_mapper_activations():
    g = tiny_graph()
    saved = {}
    for chunks in (1, 4):
        model = parallelize(make_model(g, channels=24), g, ParallelConfig(1, chunks=chunks))
        gi = model.graph
        xs = torch.randn(2, gi.num_mesh, 24, requires_grad=True)
        xd = torch.randn(2, gi.num_data, 24, requires_grad=True)
        edge = model.edge_inputs("decoder")
        saved[chunks] = _saved_bytes(
            lambda m=model, xs=xs, xd=xd, e=edge: m.runner(m.graph, "decoder", m.decoder, xs, xd, e)
        )
    # unchunked: every activation of the block (per edge and per row); chunked: the inputs the
    # checkpoints hold (shared, not copied) and the index tensors
    assert saved[4] < saved[1] / 4, saved


def test_compile_applies_where_blocks_run_whole(caplog):
    """``model.compile`` compiles every block of a whole-graph model (compilation itself waits for
    the first call); sharded or chunked blocks run on subsets of their destinations, so
    parallelize leaves them eager and says so."""
    g = tiny_graph()

    def compiled(model):
        blocks = (model.encoder, *model.processor, model.decoder)
        return [b._compiled_call_impl is not None for b in blocks]

    assert compiled(parallelize(make_model(g, compile=True), g, ParallelConfig())) == [True] * 4
    assert compiled(parallelize(make_model(g), g, ParallelConfig())) == [False] * 4
    with caplog.at_level("WARNING", logger="squall.parallel.parallelize"):
        chunked = parallelize(make_model(g, compile=True), g, ParallelConfig(chunks=2))
    assert compiled(chunked) == [False] * 4
    assert "model.compile has no effect on chunked blocks" in caplog.text
