"""Members spread over an ensemble group train what one process holding all members trains.

The ensemble is an axis of the layout (``world = ensemble x model_parallel x data_parallel``)
applied by ``parallelize``: each rank of an ensemble group holds ``M / E`` members of every sample
of its replica, draws their noise as one process would (keyed by forward and global sample),
all-gathers the members for the afCRPS, and gradients are summed over the ensemble and model
groups and averaged over replicas. Without the ensemble sum a rank steps on its own members' part
of the gradient and ends ~lr away from the reference.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from parallel_workers import make_model, spawn, tiny_graph

from squall.distributed.layout import Layout, LayoutError, build_groups
from squall.parallel.ensemble import SharedNoise, member_slice
from squall.parallel.parallelize import (
    ParallelConfig,
    parallelize,
    reduce_loss,
    single_process_groups,
)
from squall.train.loop import Trainer, VariableLayout

ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 4,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # fmt: skip
STEPS, BATCH, MEMBERS, SEED = 2, 1, 4, 5  # BATCH: samples per data-parallel replica
GRID = 544  # O8


def _batches(dtype, replicas: int) -> list[dict]:
    """Global batches of ``BATCH * replicas`` samples; replica ``d`` reads the ``d``-th block."""
    gen = torch.Generator().manual_seed(11)
    n = BATCH * replicas
    return [{"x": torch.randn(n, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype),
             "y": torch.randn(n, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(STEPS)]  # fmt: skip


def _model(dtype):
    model = make_model(tiny_graph(), noise_channels=3, ensemble_members=MEMBERS).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the noise conditioning starts at zero: wake it so members differ
        for name, p in model.named_parameters():
            if ".noise." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _train(dtype, replicas: int, config=None, groups=None):
    """Train ``STEPS`` steps; returns parameters and the global losses."""
    config = config or ParallelConfig(noise_seed=SEED)
    model = parallelize(_model(dtype), tiny_graph(), config, groups or single_process_groups())
    trainer = Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING),
                      torch.device("cpu"), logger=None)  # fmt: skip
    losses = []
    # one process takes the global batch; replica d its d-th block, its ranks their grid rows
    rows = slice(None) if groups is None else slice(groups.data_rank * BATCH,
                                                    (groups.data_rank + 1) * BATCH)  # fmt: skip
    for batch in _batches(dtype, replicas):
        mine = {k: model.runner.local_rows(v[rows], dim=2) for k, v in batch.items()}
        loss, _ = trainer.train_step(mine)
        losses.append(float(loss if groups is None else reduce_loss(loss, groups)))
    return {n: p.detach().double() for n, p in model.named_parameters()}, losses


def _train_rank(rank, world, layouts, out_dir):
    for ensemble, model_parallel in layouts:  # one spawn for several layouts of this world
        layout = Layout(world, model_parallel, ensemble)
        config = ParallelConfig(model_parallel=model_parallel, ensemble=ensemble, noise_seed=SEED)
        params, losses = _train(torch.float32, layout.data_parallel, config, build_groups(layout))
        torch.save({"params": params, "losses": losses},
                   f"{out_dir}/{layout.name}-rank{rank}.pt")  # fmt: skip


_REFERENCE: dict = {}


def _reference(replicas: int):
    """fp64 and fp32 single-process runs holding every member and the global batch."""
    if replicas not in _REFERENCE:
        _REFERENCE[replicas] = (_train(torch.float64, replicas), _train(torch.float32, replicas))
    return _REFERENCE[replicas]


def test_shared_noise_gives_each_member_its_rows():
    model = _model(torch.float32)
    whole = SharedNoise(model, SEED, MEMBERS, 0, MEMBERS)(2 * BATCH * MEMBERS)
    # two ensemble ranks (2 members each) of two data-parallel replicas (BATCH samples each)
    for d in range(2):
        halves = [SharedNoise(model, SEED, MEMBERS, 2 * r, 2, d)(BATCH * 2) for r in range(2)]
        for b in range(BATCH):
            row = MEMBERS * (d * BATCH + b)
            for r in range(2):
                assert torch.equal(halves[r][2 * b : 2 * b + 2],
                                   whole[row + 2 * r : row + 2 * r + 2])  # fmt: skip
    noise = SharedNoise(model, SEED, MEMBERS, 0, MEMBERS)
    assert not torch.equal(noise(MEMBERS), noise(MEMBERS)), "fresh noise at every forward"
    assert [member_slice(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match="does not divide"):
        member_slice(3, 2, 0)


def test_layouts_that_do_not_divide_are_refused_in_one_line():
    lay = Layout(8, 2, 2)
    assert (lay.data_parallel, lay.name) == (2, "ens2xmp2xdp2")
    assert lay.model_groups()[1] == [2, 3] and lay.ensemble_groups()[1] == [1, 3]
    assert lay.data_groups()[1] == [1, 5]
    assert [(lay.model_rank(5), lay.ensemble_rank(5), lay.data_rank(5))] == [(1, 0, 1)]
    with pytest.raises(LayoutError, match=r"world_size=6 must be a positive multiple of "
                       r"ensemble=2 x model_parallel=2 = 4"):  # fmt: skip
        Layout(6, 2, 2)
    with pytest.raises(LayoutError, match="members=3 does not split over ensemble=2"):
        Layout(2, 1, 2).check({"data": 544}, batch_size=1, members=3)
    with pytest.raises(LayoutError, match="parallel.ensemble=0"):
        ParallelConfig(ensemble=0)
    # jobs.train reads parallel.ensemble; one process cannot hold a group of two
    cfg = OmegaConf.create({"parallel": {"ensemble": 2}, "training": {"seed": 1}})
    assert ParallelConfig.from_cfg(cfg.parallel).ensemble == 2
    from squall.parallel.parallelize import prepare_parallel

    with pytest.raises(LayoutError, match="world_size=1 must be a positive multiple of ensemble=2"):
        prepare_parallel(cfg, tiny_graph())


@pytest.mark.slow  # ens2: 2 ranks; ens2xdp2 and ens2xmp2: one spawn of 4 ranks
@pytest.mark.parametrize(("world", "layouts"), [(2, [(2, 1)]), (4, [(2, 1), (2, 2)])],
                         ids=["ens2", "ens2xdp2-ens2xmp2"])  # fmt: skip
def test_members_over_ranks_equal_one_process_with_all_members(world, layouts, tmp_path):
    spawn(_train_rank, world, layouts, str(tmp_path))
    for ensemble, model_parallel in layouts:
        layout = Layout(world, model_parallel, ensemble)
        results = [torch.load(tmp_path / f"{layout.name}-rank{r}.pt") for r in range(world)]
        _check(results, layout)


def _check(results: list[dict], layout: Layout) -> None:
    (exact, exact_losses), (fp32, fp32_losses) = _reference(layout.data_parallel)
    for step, (want, ref) in enumerate(zip(exact_losses, fp32_losses, strict=True)):
        # the global loss is the fp32 sum of every rank's share (reduce_loss): one rounding
        # per rank on top of the reference's own fp32 error
        tol = 4 * abs(ref - want) + layout.world_size * torch.finfo(torch.float32).eps * abs(want)
        for r, result in enumerate(results):
            assert abs(result["losses"][step] - want) <= tol, f"{layout.name} step {step} rank {r}"
    # the reference's own fp32 error, a few times over (the gather and all-reduce reorder
    # sums), plus one ulp of the largest parameter
    ref_err = max((fp32[n] - exact[n]).abs().max().item() for n in exact)
    scale = max(p.abs().max().item() for p in exact.values())
    tol = 4 * ref_err + torch.finfo(torch.float32).eps * scale
    for r, result in enumerate(results):
        err = max((result["params"][n] - exact[n]).abs().max().item() for n in exact)
        assert err <= tol, f"{layout.name} rank {r}: max parameter error {err:.3g} > {tol:.3g}"
    # the tolerance is well below the steps' size (~lr each; a rank that stepped on its own
    # members' gradient alone would be that far off)
    start = _model(torch.float64).state_dict()
    moved = max((exact[n] - start[n]).abs().max().item() for n in exact)
    assert moved > 10 * tol, f"parameters moved {moved:.3g}, tolerance {tol:.3g}"
