"""Sharded checkpoints on GPUs: save at P=2 (NCCL, parameters sharded with FSDP2), resume at P=1
and at P=2 (another sharding), and compare the next losses and parameters with one unsharded run.

    torchrun --standalone --nproc-per-node 2 profiling/check_sharded_checkpoint.py --dir D
    python profiling/check_sharded_checkpoint.py --dir D --single      # P=1 resume + verdict

The GPU counterpart of ``tests/parallel/test_parameter_sharding.py::
test_sharded_checkpoint_resumes_at_one_and_two_ranks`` (same tiny model, data, training config
and tolerances; the test runs on gloo). The two-rank launch trains 2 steps data-parallel with
sharded parameters and saves, then a fresh model-parallel sharded pair resumes and trains 2 more
steps. The single process resumes the same checkpoint unsharded, trains the same 2 steps, runs
the unsharded reference of 4 steps in fp32 and fp64 on the same GPU, and writes
``D/checkpoint_check.json``: each resume's losses and largest parameter error against fp64,
within the tolerance (4 x the fp32 reference's own error plus one ulp of the largest parameter;
losses: 4 x the fp32 loss error plus fp32 rounding of the loss's sum).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "parallel"))
from parallel_workers import make_model, tiny_graph  # noqa: E402

from squall.parallel.parallelize import (  # noqa: E402
    apply_parallelism,
    prepare_parallel,
    reduce_loss,
)
from squall.parallel.sharding import is_sharded  # noqa: E402
from squall.train.loop import Trainer, VariableLayout  # noqa: E402

ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 6,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # fmt: skip
GLOBAL_BATCH, GRID = 4, 544  # O8
FIRST, MORE = 2, 2


def batches(steps: int, dtype=torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    return [{"x": torch.randn(GLOBAL_BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype),
             "y": torch.randn(GLOBAL_BATCH, 2, GRID, 6, generator=gen, dtype=torch.float64).to(dtype)}
            for _ in range(steps)]  # fmt: skip


def trainer(model, device, ckpt=None, wrapped=None):
    distributed = dist.is_initialized()
    return Trainer(model, VariableLayout.from_roles(ROLES), OmegaConf.create(TRAINING), device,
                   logger=None, checkpoint_path=ckpt, wrapped=wrapped,
                   is_main=not distributed or dist.get_rank() == 0,
                   barrier=dist.barrier if distributed else None)  # fmt: skip


def build(model_parallel: int, shard: bool, device):
    g = tiny_graph()
    cfg = OmegaConf.create({"parallel": {"model_parallel": model_parallel, "chunks": 1,
                                         "shard_parameters": shard},
                            "model": {"processor_layers": 2},
                            "training": {"precision": "fp32", "device": str(device), "seed": 0}})  # fmt: skip
    setup = prepare_parallel(cfg, g)
    model = make_model(g, attention_backend="torch").to(device)
    model, wrapped = apply_parallelism(model, g, setup, device)
    return setup, model, wrapped


def local_batch(batch: dict, setup) -> dict:
    per = GLOBAL_BATCH // setup.data_parallel_size
    mine = slice(setup.data_parallel_rank * per, (setup.data_parallel_rank + 1) * per)
    rows = None if setup.grid_indices is None else torch.from_numpy(setup.grid_indices)
    return {k: v[mine] if rows is None else v[mine].index_select(2, rows) for k, v in batch.items()}


def full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().cpu()


def two_ranks(out: Path, device) -> None:
    """Save at P=2 (dp2, sharded) after FIRST steps; resume at P=2 (mp2, sharded), MORE steps."""
    ckpt = out / "run" / "checkpoint.pt"
    setup, model, wrapped = build(1, True, device)
    assert is_sharded(model), "parameters are not sharded at P=2"
    t = trainer(model, device, ckpt, wrapped)
    for b in batches(FIRST):
        t.train_step(local_batch(b, setup))
    t.save()
    dist.barrier()
    payload = torch.load(ckpt, weights_only=False)
    setup, model, wrapped = build(2, True, device)
    assert is_sharded(model)
    t = trainer(model, device, ckpt, wrapped)
    assert t.resume() and t.step == FIRST
    losses = []
    for b in batches(FIRST + MORE)[FIRST:]:
        loss, _ = t.train_step(local_batch(b, setup))
        losses.append(float(reduce_loss(loss, setup.groups)))
    params = {n: full(p) for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "params": params, "sharded_file": "model" not in payload,
                    "shards": sorted(p.name for p in (ckpt.parent / payload["shards"]).iterdir())},
                   out / "p2.pt")  # fmt: skip


def single(out: Path, device) -> dict:
    """Resume at P=1, the unsharded reference in fp32 and fp64, the verdict."""
    ckpt = out / "run" / "checkpoint.pt"
    setup, model, wrapped = build(1, True, device)
    t = trainer(model, device, ckpt, wrapped)
    assert t.resume() and t.step == FIRST
    p1_losses = [float(t.train_step(b)[0]) for b in batches(FIRST + MORE)[FIRST:]]
    p1 = {n: p.detach().double().cpu() for n, p in model.named_parameters()}

    def reference(dtype):
        m = make_model(tiny_graph(), attention_backend="torch").to(device, dtype)
        r = trainer(m, device)
        losses = [float(r.train_step(b)[0]) for b in batches(FIRST + MORE, dtype)]
        return {n: p.detach().double().cpu() for n, p in m.named_parameters()}, losses

    exact, exact_losses = reference(torch.float64)
    fp32, fp32_losses = reference(torch.float32)
    eps = torch.finfo(torch.float32).eps
    ref_err = max((fp32[n] - exact[n]).abs().max().item() for n in exact)
    scale = max(p.abs().max().item() for p in exact.values())
    tol = 4 * ref_err + eps * scale
    floor = eps * (GLOBAL_BATCH * GRID * 4 * 2) ** 0.5  # samples x grid x outputs x rollout
    loss_tols = [4 * abs(f - e) + floor * abs(e) for e, f in zip(exact_losses, fp32_losses,
                                                                 strict=True)][FIRST:]  # fmt: skip
    p2 = torch.load(out / "p2.pt", weights_only=False)
    start = {n: p.detach().double().cpu()
             for n, p in make_model(tiny_graph(), attention_backend="torch").named_parameters()}  # fmt: skip
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "git": os.environ.get("SQUALL_GIT_SHA", "?"),
              "sharded_checkpoint": p2["sharded_file"], "shard_files": p2["shards"],
              "unsharded_losses_fp64": exact_losses[FIRST:],
              "unsharded_losses_fp32": fp32_losses[FIRST:], "loss_tolerance": loss_tols,
              "param_tolerance": tol, "fp32_reference_error": ref_err,
              "parameters_moved": max((exact[n] - start[n]).abs().max().item() for n in exact)}  # fmt: skip
    passed = result["sharded_checkpoint"]
    for name, losses, params in (("resume_p1", p1_losses, p1), ("resume_p2", p2["losses"],
                                                                  p2["params"])):  # fmt: skip
        err = max((params[n] - exact[n]).abs().max().item() for n in exact)
        dl = [abs(a - b) for a, b in zip(losses, exact_losses[FIRST:], strict=True)]
        ok = err <= tol and all(d <= t for d, t in zip(dl, loss_tols, strict=True))
        result[name] = {"losses": losses, "loss_error": dl, "max_param_error": err, "passed": ok}
        passed = passed and ok
    result["passed"] = bool(passed)
    (out / "checkpoint_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--single", action="store_true", help="the P=1 resume and the verdict")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if args.single:
        device = torch.device("cuda:0" if cuda else "cpu")
        single(out, device)
        return
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        two_ranks(out, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
