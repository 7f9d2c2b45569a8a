"""Members spread over an ensemble group train what one process holding all members trains.

Each rank of the group holds ``M / E`` members of every sample (the same samples on every rank):
noise drawn whole from a shared generator, members all-gathered for the afCRPS, gradients summed
over the group (squall.parallel.ensemble). Without the gradient sum a rank steps on its own
members' part of the gradient and ends ~lr away from the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from parallel_workers import make_model, spawn, tiny_graph

from squall.parallel.ensemble import SharedNoise, apply_ensemble_parallel, member_slice
from squall.train.loop import Trainer, VariableLayout

ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 4,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # fmt: skip
STEPS, BATCH, MEMBERS, SEED = 3, 2, 4, 5
GRID = 544  # O8


def _batches(dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    return [{"x": torch.randn(BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype),
             "y": torch.randn(BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(STEPS)]  # fmt: skip


def _model(dtype):
    model = make_model(tiny_graph(), noise_channels=3, ensemble_members=MEMBERS).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the noise conditioning starts at zero: wake it so members differ
        for name, p in model.named_parameters():
            if ".noise." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _train(model, dtype, group=None):
    apply_ensemble_parallel(model, group, SEED)
    trainer = Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING),
                      torch.device("cpu"), logger=None)  # fmt: skip
    losses = [float(trainer.train_step(b)[0]) for b in _batches(dtype)]
    return {n: p.detach().double() for n, p in model.named_parameters()}, losses


def _train_rank(rank, world, out_dir):
    params, losses = _train(_model(torch.float32), torch.float32, dist.group.WORLD)
    torch.save({"params": params, "losses": losses}, f"{out_dir}/rank{rank}.pt")


def test_shared_noise_gives_each_member_its_rows():
    model = _model(torch.float32)
    whole = SharedNoise(model, SEED, MEMBERS, 0, MEMBERS)(BATCH * MEMBERS)
    halves = [SharedNoise(model, SEED, MEMBERS, 2 * r, 2)(BATCH * 2) for r in range(2)]
    for b in range(BATCH):
        for r in range(2):
            assert torch.equal(halves[r][2 * b : 2 * b + 2],
                               whole[MEMBERS * b + 2 * r : MEMBERS * b + 2 * r + 2])  # fmt: skip
    assert [member_slice(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    with pytest.raises(ValueError, match="does not divide"):
        member_slice(3, 2, 0)


@pytest.mark.slow  # 2 ranks: ~65 s on 2 loaded cores (three fp32/fp64 trainings besides)
@pytest.mark.parametrize("world", [2, 4])
def test_members_over_ranks_equal_one_process_with_all_members(world, tmp_path):
    spawn(_train_rank, world, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    exact, exact_losses = _train(_model(torch.float64), torch.float64)
    fp32, fp32_losses = _train(_model(torch.float32), torch.float32)
    for step, (want, ref) in enumerate(zip(exact_losses, fp32_losses, strict=True)):
        tol = 4 * abs(ref - want) + torch.finfo(torch.float32).eps * abs(want)
        for r, result in enumerate(results):
            assert abs(result["losses"][step] - want) <= tol, f"step {step} rank {r}"
    # the reference's own fp32 error, a few times over (the gather and all-reduce reorder
    # sums), plus one ulp of the largest parameter
    ref_err = max((fp32[n] - exact[n]).abs().max().item() for n in exact)
    scale = max(p.abs().max().item() for p in exact.values())
    tol = 4 * ref_err + torch.finfo(torch.float32).eps * scale
    for r, result in enumerate(results):
        err = max((result["params"][n] - exact[n]).abs().max().item() for n in exact)
        assert err <= tol, f"rank {r}: max parameter error {err:.3g} > {tol:.3g}"
    # the tolerance is well below the steps' size (~lr each; a rank that stepped on its own
    # members' gradient alone would be that far off)
    start = _model(torch.float64).state_dict()
    moved = max((exact[n] - start[n]).abs().max().item() for n in exact)
    assert moved > 10 * tol, f"parameters moved {moved:.3g}, tolerance {tol:.3g}"
