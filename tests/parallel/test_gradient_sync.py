"""Every layout trains the same model: after a few AdamW steps each replica holds the parameters of
one process training on the union of the replicas' batches.

Layouts are ``model_parallel x data_parallel`` ranks with ``chunks`` mapper pieces, built through
:func:`squall.parallel.parallelize.apply_parallelism`, the one place that decides how a model spans
its ranks. A replica that stepped on its own gradients (no synchronisation) ends ~lr away from the
reference; fp32 reordering noise is ~1e-6 of that.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from parallel_workers import make_model, spawn, tiny_graph

from squall.parallel.parallelize import apply_parallelism, prepare_parallel, reduce_loss
from squall.train.loop import Trainer, VariableLayout

# prognostic 0-2 (residual), forcings 3-4 (inputs only), diagnostic 5 (output only)
ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 4,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # clipping active: the norm must be global  # fmt: skip
STEPS = 3
PER_REPLICA = 2  # samples per replica and step
GRID = 544  # O8


def _global_batches(replicas: int, dtype=torch.float32) -> list[dict]:
    """Per step: the union of every replica's samples (replica r holds rows r*B .. (r+1)*B)."""
    gen = torch.Generator().manual_seed(11)
    n = replicas * PER_REPLICA
    # two input steps, rollout 2, on the whole O8 grid
    return [{"x": torch.randn(n, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype),
             "y": torch.randn(n, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(STEPS)]  # fmt: skip


def _train_single(replicas: int, dtype: torch.dtype):
    """Parameters (as float64) and per-step losses of one process on the union of batches."""
    g = tiny_graph()
    model = make_model(g).to(dtype)
    trainer = Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING),
                      torch.device("cpu"), logger=None)  # fmt: skip
    losses = [float(trainer.train_step(batch)[0]) for batch in _global_batches(replicas, dtype)]
    return {n: p.detach().double() for n, p in model.named_parameters()}, losses


def _train_layout(rank, world, model_parallel, chunks, out_dir):
    g = tiny_graph()
    cfg = OmegaConf.create({"parallel": {"model_parallel": model_parallel, "chunks": chunks},
                            "model": {"processor_layers": 2}})  # fmt: skip
    setup = prepare_parallel(cfg, g)
    model, wrapped = apply_parallelism(make_model(g), g, setup, torch.device("cpu"))
    trainer = Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING),
                      torch.device("cpu"), logger=None, wrapped=wrapped)  # fmt: skip
    replica = setup.data_parallel_rank
    mine = slice(replica * PER_REPLICA, (replica + 1) * PER_REPLICA)
    rows = None if setup.grid_indices is None else torch.from_numpy(setup.grid_indices)
    losses = []
    for batch in _global_batches(setup.data_parallel_size):
        local = {k: v[mine] if rows is None else v[mine].index_select(2, rows)
                 for k, v in batch.items()}  # fmt: skip
        loss, _grad_norm = trainer.train_step(local)
        losses.append(float(reduce_loss(loss, setup.groups)))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"params": params, "losses": losses}, f"{out_dir}/rank{rank}.pt")


LAYOUTS = [  # (model_parallel, data_parallel, chunks)
    pytest.param(1, 2, 1, id="dp2-ddp"),
    pytest.param(1, 2, 2, id="dp2-chunks2"),
    pytest.param(2, 1, 1, id="mp2"),
    pytest.param(2, 1, 2, id="mp2-chunks2"),
    pytest.param(1, 3, 2, id="dp3-chunks2", marks=pytest.mark.slow),
    pytest.param(3, 1, 1, id="mp3", marks=pytest.mark.slow),
    pytest.param(2, 2, 1, id="mp2-dp2", marks=pytest.mark.slow),
    pytest.param(2, 2, 2, id="mp2-dp2-chunks2", marks=pytest.mark.slow),
    pytest.param(1, 4, 1, id="dp4-ddp", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model_parallel,data_parallel,chunks", LAYOUTS)
def test_every_replica_equals_one_process_on_the_union_of_batches(
    model_parallel, data_parallel, chunks, tmp_path
):
    world = model_parallel * data_parallel
    spawn(_train_layout, world, model_parallel, chunks, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ranks = [r["params"] for r in results]

    exact, exact_losses = _train_single(data_parallel, torch.float64)
    fp32, fp32_losses = _train_single(data_parallel, torch.float32)
    # the global loss of every step, against the measured fp32 noise; the floor is fp32 rounding
    # of a sum of that many terms (random-walk growth, sqrt of the count)
    terms = data_parallel * PER_REPLICA * GRID * 4 * 2  # samples x grid x outputs x rollout
    floor = torch.finfo(torch.float32).eps * terms**0.5
    for step, (want, ref) in enumerate(zip(exact_losses, fp32_losses, strict=True)):
        loss_tol = 4 * abs(ref - want) + floor * abs(want)
        for r, result in enumerate(results):
            got = result["losses"][step]
            assert abs(got - want) <= loss_tol, f"step {step} rank {r}: loss {got} vs {want}"
    # The reference's own fp32 error after the same steps, over all parameters; a layout may
    # reorder sums (halo, chunk merges, all-reduce), so allow a few times that, plus one ulp.
    ref_err = max((fp32[n] - exact[n]).abs().max().item() for n in exact)
    scale = max(p.abs().max().item() for p in exact.values())
    tol = 4 * ref_err + torch.finfo(torch.float32).eps * scale
    for r, params in enumerate(ranks):
        err = max((params[n].double() - exact[n]).abs().max().item() for n in exact)
        assert err <= tol, (
            f"rank {r}: max parameter error {err:.3g} > {tol:.3g} (fp32 ref {ref_err:.3g})"
        )
    # replicas of one parameter step on one all-reduced gradient: bitwise the same
    for params in ranks[1:]:
        for name, p in params.items():
            assert torch.equal(p, ranks[0][name]), name
