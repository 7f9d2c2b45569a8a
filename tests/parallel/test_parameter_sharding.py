"""Parameter sharding (FSDP2 through ``parallelize``) trains the same model as one process, holds
about ``1 / P`` of the parameter, gradient and optimizer state per rank, and its checkpoints
resume on another rank count.

Every layout sees the same global batch per step (split over the data-parallel replicas, each
sample's grid split over the model group); the reference is one unsharded process on the whole
batch, in fp64 (exact) and fp32 (its own rounding noise). A sharded run whose gradients were
averaged over the world instead of summed over the model group, or reduced over the wrong ranks,
ends ~lr away from the reference; fp32 reordering noise is ~1e-6 of that.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from parallel_workers import make_model, spawn, tiny_graph

from squall.parallel.parallelize import apply_parallelism, prepare_parallel, reduce_loss
from squall.parallel.sharding import is_sharded, local_state_bytes
from squall.train.loop import Trainer, VariableLayout

# prognostic 0-2 (residual), forcings 3-4 (inputs only), diagnostic 5 (output only)
ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 6,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # clipping active: the norm must be global  # fmt: skip
GLOBAL_BATCH = 4  # samples per step, split over the data-parallel replicas
GRID = 544  # O8


def _batches(steps: int, dtype=torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    # two input steps, rollout 2, on the whole O8 grid
    return [{"x": torch.randn(GLOBAL_BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype),
             "y": torch.randn(GLOBAL_BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(steps)]  # fmt: skip


def _trainer(model, checkpoint_path=None, distributed=False, wrapped=None):
    import torch.distributed as dist

    return Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING),
                   torch.device("cpu"), logger=None, checkpoint_path=checkpoint_path,
                   wrapped=wrapped, is_main=not distributed or dist.get_rank() == 0,
                   barrier=dist.barrier if distributed else None)  # fmt: skip


@functools.cache
def _reference(steps: int, dtype: torch.dtype):
    """Parameters (float64) and per-step losses of one unsharded process on the whole batch
    (shared by the tests: read only)."""
    model = make_model(tiny_graph()).to(dtype)
    trainer = _trainer(model)
    losses = [float(trainer.train_step(b)[0]) for b in _batches(steps, dtype)]
    return {n: p.detach().double() for n, p in model.named_parameters()}, losses


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def _build(model_parallel: int, shard: bool, chunks: int = 1):
    g = tiny_graph()
    cfg = OmegaConf.create({"parallel": {"model_parallel": model_parallel, "chunks": chunks,
                                         "shard_parameters": shard},
                            "model": {"processor_layers": 2},
                            "training": {"precision": "fp32", "device": "cpu", "seed": 0}})  # fmt: skip
    setup = prepare_parallel(cfg, g)
    model, wrapped = apply_parallelism(make_model(g), g, setup, torch.device("cpu"))
    return setup, model, wrapped


def _local_batch(batch: dict, setup) -> dict:
    per = GLOBAL_BATCH // setup.data_parallel_size
    mine = slice(setup.data_parallel_rank * per, (setup.data_parallel_rank + 1) * per)
    rows = None if setup.grid_indices is None else torch.from_numpy(setup.grid_indices)
    return {k: v[mine] if rows is None else v[mine].index_select(2, rows) for k, v in batch.items()}


def _train_layout(rank, world, model_parallel, chunks, steps, out_dir, ckpt=None, first=0):
    """``steps`` steps from step ``first`` (resuming ``ckpt`` when ``first > 0``, saving it at
    the end otherwise); writes this rank's full parameters, losses and state bytes."""
    setup, model, wrapped = _build(model_parallel, True, chunks)
    assert is_sharded(model)
    trainer = _trainer(model, None if ckpt is None else Path(ckpt), True, wrapped)
    if first:
        assert trainer.resume() and trainer.step == first
    losses = []
    for batch in _batches(first + steps)[first:]:
        loss, _ = trainer.train_step(_local_batch(batch, setup))
        losses.append(float(reduce_loss(loss, setup.groups)))
    state = local_state_bytes(model, trainer.optimizer)
    if ckpt is not None and not first:
        trainer.save()
    params = {n: _full(p) for n, p in model.named_parameters()}
    torch.save({"params": params, "losses": losses, "bytes": state}, f"{out_dir}/rank{rank}.pt")


def _tolerances(exact, fp32, exact_losses, fp32_losses):
    """Parameter tolerance: a few times the fp32 reference's own error (a layout reorders sums:
    all-gather, reduce-scatter, halo), plus one ulp of the largest parameter. Loss tolerance: the
    same against the fp32 loss error, floored by fp32 rounding of a sum of that many terms
    (random-walk growth)."""
    ref_err = max((fp32[n] - exact[n]).abs().max().item() for n in exact)
    scale = max(p.abs().max().item() for p in exact.values())
    eps = torch.finfo(torch.float32).eps
    floor = eps * (GLOBAL_BATCH * GRID * 4 * 2) ** 0.5  # samples x grid x outputs x rollout
    loss_tols = [4 * abs(f - e) + floor * abs(e) for e, f in zip(exact_losses, fp32_losses,
                                                                 strict=True)]  # fmt: skip
    return 4 * ref_err + eps * scale, loss_tols


def _check(results, exact, exact_losses, tol, loss_tols, what):
    for r, result in enumerate(results):
        for step, (got, want, lt) in enumerate(zip(result["losses"], exact_losses, loss_tols,
                                                   strict=True)):  # fmt: skip
            assert abs(got - want) <= lt, f"{what} rank {r} step {step}: loss {got} vs {want}"
        err = max((result["params"][n].double() - exact[n]).abs().max().item() for n in exact)
        assert err <= tol, f"{what} rank {r}: max parameter error {err:.3g} > {tol:.3g}"


# (model_parallel, data_parallel, chunks). mp2 runs in the default suite (mp2_run below); the
# slow set adds data parallelism, both axes at 4 ranks, and chunking. dp4 and mp4 add nothing the
# 4-rank mp2-dp2 does not (the shard group is the whole world in every layout) and cost 40 s each.
LAYOUTS = [
    pytest.param(1, 2, 1, id="dp2", marks=pytest.mark.slow),
    pytest.param(2, 2, 1, id="mp2-dp2", marks=pytest.mark.slow),
    pytest.param(2, 1, 2, id="mp2-chunks2", marks=pytest.mark.slow),
]
STEPS = 3


def _run_layout(model_parallel, data_parallel, chunks, out: Path) -> list[dict]:
    world = model_parallel * data_parallel
    spawn(_train_layout, world, model_parallel, chunks, STEPS, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def mp2_run(tmp_path_factory) -> list[dict]:
    """Two model-parallel sharded ranks after STEPS steps (the default suite's one spawn)."""
    return _run_layout(2, 1, 1, tmp_path_factory.mktemp("mp2"))


def test_sharded_model_parallel_pair_equals_one_unsharded_process(mp2_run):
    _check_layout(mp2_run, 2, 1)


@pytest.mark.parametrize("model_parallel,data_parallel,chunks", LAYOUTS)
def test_sharded_parameters_equal_one_unsharded_process(model_parallel, data_parallel, chunks,
                                                        tmp_path):  # fmt: skip
    results = _run_layout(model_parallel, data_parallel, chunks, tmp_path)
    _check_layout(results, model_parallel, data_parallel)


def _check_layout(results, model_parallel, data_parallel):
    exact, exact_losses = _reference(STEPS, torch.float64)
    fp32, fp32_losses = _reference(STEPS, torch.float32)
    tol, loss_tols = _tolerances(exact, fp32, exact_losses, fp32_losses)
    _check(results, exact, exact_losses, tol, loss_tols, f"mp{model_parallel} dp{data_parallel}")
    # the shards of one parameter are gathered from one optimizer step: every rank sees the same
    for result in results[1:]:
        for name, p in result["params"].items():
            assert torch.equal(p, results[0]["params"][name]), name


def test_state_per_rank_at_two_ranks_is_at_most_055_of_one(mp2_run):
    """Parameters + gradients + AdamW state held by each of 2 model-parallel ranks (their local
    shards, measured after training) against one unsharded process's. 0.5 is the even split; the
    rest is dim-0 padding of odd-sized tensors and AdamW's replicated step counters."""
    per_rank = [r["bytes"] for r in mp2_run]
    model = make_model(tiny_graph())
    trainer = _trainer(model)
    trainer.train_step(_batches(1)[0])
    one = local_state_bytes(model, trainer.optimizer)
    assert one["total"] == 4 * one["parameters"] + sum(  # params, grads, exp_avg, exp_avg_sq
        s["step"].numel() * s["step"].element_size() for s in trainer.optimizer.state.values()
    )
    for r, b in enumerate(per_rank):
        assert b["total"] <= 0.55 * one["total"], f"rank {r}: {b} vs one process {one}"
    # nothing lost: the shards add up to at least the whole
    assert sum(b["parameters"] for b in per_rank) >= one["parameters"]


def _resume_single(ckpt: Path, first: int, steps: int):
    """Resume ``ckpt`` in this process, unsharded (P=1), and train ``steps`` steps."""
    setup, model, wrapped = _build(1, True)  # shard_parameters has no effect on one rank
    assert not is_sharded(model)
    trainer = _trainer(model, ckpt, False, wrapped)
    assert trainer.resume() and trainer.step == first
    losses = [float(trainer.train_step(b)[0]) for b in _batches(first + steps)[first:]]
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "losses": losses}  # fmt: skip


@pytest.mark.slow
def test_sharded_checkpoint_resumes_at_one_and_two_ranks(tmp_path):
    """Save at P=2 (data-parallel, sharded) after 2 steps; resume at P=1 (one process) and at
    P=2 (model-parallel, another sharding of the same parameters): the next two losses and the
    parameters after them equal one unsharded run of 4 steps (optimizer and scheduler states
    restored: the second loss depends on them)."""
    first, more = 2, 2
    ckpt = tmp_path / "run" / "checkpoint.pt"
    spawn(_train_layout, 2, 1, 1, first, str(tmp_path), str(ckpt), 0)
    payload = torch.load(ckpt, weights_only=False)
    assert "model" not in payload and (ckpt.parent / payload["shards"]).is_dir()

    exact, exact_losses = _reference(first + more, torch.float64)
    fp32, fp32_losses = _reference(first + more, torch.float32)
    tol, loss_tols = _tolerances(exact, fp32, exact_losses, fp32_losses)

    single = _resume_single(ckpt, first, more)
    _check([single], exact, exact_losses[first:], tol, loss_tols[first:], "P=1 resume")

    out = tmp_path / "p2"
    out.mkdir()
    spawn(_train_layout, 2, 2, 1, more, str(out), str(ckpt), first)
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    _check(results, exact, exact_losses[first:], tol, loss_tols[first:], "P=2 resume")


def test_sharded_checkpoint_is_atomic_and_resumes_exactly(tmp_path):
    """A sharded checkpoint saved twice keeps only the directory its file names; resuming it at
    P=1 gives exactly (bitwise) the state a P=1 run would load from its own single-file
    checkpoint of the same parameters."""
    from squall.parallel.state import save_sharded, shards_root
    from squall.train.checkpoint import load_checkpoint, read_payload

    model = make_model(tiny_graph())
    trainer = _trainer(model)
    trainer.train_step(_batches(1)[0])
    path = tmp_path / "checkpoint.pt"
    for _ in range(2):
        save_sharded(path, model, trainer.optimizer, trainer.scheduler, 1, 4, {"k": 1})
    payload = torch.load(path, weights_only=False)
    assert [p.name for p in shards_root(path).iterdir()] == [Path(payload["shards"]).name]
    fresh = make_model(tiny_graph(), seed=5)
    other = _trainer(fresh)
    loaded = load_checkpoint(path, fresh, other.optimizer, other.scheduler)
    assert loaded["step"] == 1 and loaded["extra"] == {"k": 1}
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(trainer.optimizer.state[p][key], other.optimizer.state[q][key])
    assert other.scheduler.state_dict() == trainer.scheduler.state_dict()
    # a forecast reads the whole model from the same file
    whole = read_payload(path, "")["model"]
    assert whole.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(whole[name], t), name


@pytest.mark.slow
def test_single_file_checkpoint_resumes_sharded(tmp_path):
    """An unsharded run's single-file checkpoint (P=1, 2 steps) resumes sharded at P=2: each
    rank takes its shards of the full parameters and AdamW state; the next two steps equal one
    unsharded run of 4 steps."""
    first, more = 2, 2
    ckpt = tmp_path / "run" / "checkpoint.pt"
    _setup, model, wrapped = _build(1, False)
    trainer = _trainer(model, ckpt, False, wrapped)
    for batch in _batches(first):
        trainer.train_step(batch)
    trainer.save()
    assert "model" in torch.load(ckpt, weights_only=False)  # the single-file format

    exact, exact_losses = _reference(first + more, torch.float64)
    fp32, fp32_losses = _reference(first + more, torch.float32)
    tol, loss_tols = _tolerances(exact, fp32, exact_losses, fp32_losses)
    out = tmp_path / "p2"
    out.mkdir()
    spawn(_train_layout, 2, 2, 1, more, str(out), str(ckpt), first)
    results = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    _check(results, exact, exact_losses[first:], tol, loss_tols[first:], "P=2 from one file")
