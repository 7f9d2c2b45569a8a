"""Ensemble training throughput with the members of each sample on one GPU and spread over the
ranks of an ensemble group (``parallel.ensemble``, applied by ``parallelize``), and a check that
the spread members train what one process holding all of them trains.

    torchrun --nproc-per-node 2 profiling/bench_ensemble.py --members 4       # two H200s
    torchrun --nproc-per-node 2 profiling/bench_ensemble.py --tiny --members 4  # CPU (gloo) check

With ``W`` ranks, three phases in one launch (one graph build):

1. **one GPU**: rank 0 alone trains all ``--members`` members of ``--batch`` samples per step (the
   others wait): the one-GPU rate;
2. **W GPUs**: every rank trains ``members / W`` of them (``Layout(W, 1, W)``: one ensemble group),
   members all-gathered for the afCRPS, gradients summed over the group;
3. **check**: a small fp32 model trained ``--check-steps`` steps spread over the ``W`` ranks
   against rank 0 holding every member in fp32 and fp64 on the same device (the noise is drawn
   on the device, so the reference must run there too). Passes when the largest parameter error
   is within 4 x the fp32 reference's own error plus one ulp of the largest parameter (the
   tolerance of tests/parallel/test_ensemble_parallel.py) and the parameters moved more than
   10 tolerances. Reported beside: the error of a control run whose ranks step on their own
   members' gradient alone (no sum over the group), and the reference's worst tensors.

A training step is ``Trainer.train_step`` of jobs.train: members folded into the batch, one
rollout step, afCRPS (alpha 0.95), backward, gradient clipping, AdamW. The model is o96_ens's
(1024 channels, 16 layers, 16 heads, 16 noise channels, triton attention, bf16 autocast,
``--checkpoint`` policy on every block) on ``--graph``; ``--tiny`` is a CPU-sized model on O8.
Inputs are random normalised fields (never zeros). ``member_samples_per_s`` = members x batch /
median step time after ``--warmup`` steps. After the timed steps the member all-gather of one
step (``gather_s``) and the gradient all-reduce (``allreduce_s``) are timed alone. Appends one
row per phase to profiling/results/ensemble.csv (rank 0) and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.distributed.layout import Layout, build_groups  # noqa: E402
from squall.graphs import build_graph  # noqa: E402
from squall.graphs.store import load_or_build  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.parallel.parallelize import (  # noqa: E402
    ParallelConfig,
    parallelize,
    single_process_groups,
)
from squall.train.loop import Trainer, VariableLayout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The synthetic default's columns: 6 prognostic, tp (diagnostic), 7 forcings.
ROLES = {"prognostic": list(range(6)), "diagnostic": [6], "forcing": list(range(7, 14))}
COLUMNS, INPUT_STEPS = 14, 2
TINY_GRAPH = {"name": "o8_l2", "nodes": {"data": {"type": "grid", "grid": "O8"},
              "hidden": {"type": "icosahedral", "level": 2}},
              "edges": {"encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
                        "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
                        "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3}}}  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--members", type=int, default=4, help="members per sample, all ranks")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out (autotuning)")
    p.add_argument("--checkpoint", default="mlp", help="none | mlp | full, every block")
    p.add_argument("--check-steps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="CPU-sized model on O8 (a check)")
    p.add_argument("--graph-cache", default="/tmp/squall-graphs")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument("--check-only", action="store_true", help="phase 3 alone (no throughput)")
    return p.parse_args()


def training_cfg(precision: str):
    return OmegaConf.create({"lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 1,
                             "max_steps": 1000, "min_lr_ratio": 0.1, "precision": precision,
                             "grad_clip": 1.0})  # fmt: skip


def build_model(graph, cfg: ModelConfig, device, dtype=torch.float32, config=None, groups=None):
    torch.manual_seed(0)
    layout = VariableLayout.from_roles(ROLES)
    model = GraphForecaster(graph, cfg, len(layout.inputs), len(layout.outputs), INPUT_STEPS,
                            layout.residual).to(device=device, dtype=dtype)  # fmt: skip
    with torch.no_grad():  # the noise conditioning starts at zero: wake it so members differ
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if ".noise." in name or name.startswith("head."):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    config = config or ParallelConfig(noise_seed=7)
    return parallelize(model, graph, config, groups or single_process_groups()), layout


def batches(n: int, batch: int, grid: int, device, dtype=torch.float32) -> list[dict]:
    gen = torch.Generator().manual_seed(11)
    return [{"x": torch.randn(batch, INPUT_STEPS, grid, COLUMNS, generator=gen).to(device, dtype),
             "y": torch.randn(batch, 1, grid, COLUMNS, generator=gen).to(device, dtype)}
            for _ in range(n)]  # fmt: skip


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer, data, warmup, device) -> list[float]:
    times = []
    for i, batch in enumerate(data):
        sync(device)
        began = time.perf_counter()
        trainer.train_step(batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return times


def comm_times(model, batch: int, device, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one step's member all-gather and of the gradient all-reduce, alone."""
    gather = getattr(model, "member_gather", None)
    reducer = getattr(model.runner, "grad_reducer", None)
    if gather is None:
        return 0.0, 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = torch.ones(batch, model.local_members, model.graph.num_data, model.head.out_features,
                       device=device, dtype=dtype)  # fmt: skip
    out = []
    for fn in (lambda: gather(local), reducer.reduce if reducer else (lambda: None)):
        times = []
        for _ in range(repeats + 1):  # the first round sets up the connections: not timed
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times[1:]))
    return out[0], out[1]


def peak_gib(device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def throughput(args, graph, mcfg, device, world, rank) -> list[dict]:
    """Phases 1 and 2: the one-GPU rate on rank 0, then every rank's share of the members."""
    grid = len(graph.nodes["data"])
    precision = "bf16" if device.type == "cuda" else "fp32"
    data = batches(args.warmup + args.steps, args.batch, grid, device)
    rows = []
    for ranks in sorted({1, world}):
        if rank < ranks:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            groups = config = None
            if ranks > 1:
                groups = build_groups(Layout(world, 1, world))
                config = ParallelConfig(ensemble=world, noise_seed=7)
            model, layout = build_model(graph, mcfg, device, config=config, groups=groups)
            trainer = Trainer(model, layout, training_cfg(precision), device, logger=None)
            times = time_steps(trainer, data, args.warmup, device)
            gather_s, allreduce_s = comm_times(model, args.batch, device) if ranks > 1 else (0, 0)
            step_s = statistics.median(times)
            memory = peak_gib(device)
            del model, trainer
        if world > 1:
            dist.barrier()
        if ranks > 1:
            peaks = [None] * world
            dist.all_gather_object(peaks, round(memory, 2))
        else:
            peaks = [round(memory, 2)] if rank == 0 else []
        if rank == 0:
            rows.append({**machine_info(), "graph": "o8_l2" if args.tiny else args.graph,
                         "members": args.members, "ranks": ranks,
                         "members_per_rank": args.members // ranks, "batch": args.batch,
                         "checkpoint": "none" if args.tiny else args.checkpoint,
                         "precision": precision, "step_s": round(step_s, 5),
                         "step_p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 5),
                         "member_samples_per_s": round(args.members * args.batch / step_s, 3),
                         "gather_s": round(gather_s, 5), "allreduce_s": round(allreduce_s, 5),
                         "memory_GiB_per_rank": "/".join(str(p) for p in peaks),
                         "steps": args.steps})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def check(args, graph, device, world, rank) -> dict:
    """Phase 3: spread members against one process holding all of them."""
    mcfg = ModelConfig(num_channels=48, num_heads=4, processor_layers=2, noise_channels=4,
                       ensemble_members=args.members)  # fmt: skip
    grid = len(graph.nodes["data"])

    def train(dtype, config=None, groups=None, unsynced=False):
        model, layout = build_model(graph, mcfg, device, dtype, config, groups)
        if unsynced:  # the control: each rank steps on its own members' gradient alone
            model.runner.grad_reducer.remove()
            model.runner.grad_reducer = None
        trainer = Trainer(model, layout, training_cfg("fp32"), device, logger=None)
        grads = None
        for batch in batches(args.check_steps, 2, grid, device, dtype):
            trainer.train_step(batch)
            if grads is None:  # the first step's (clipped) gradients, before AdamW acts on them
                grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
                         if p.grad is not None}  # fmt: skip
        train.grads[(dtype, unsynced, config is not None)] = grads
        return {n: p.detach().double() for n, p in model.named_parameters()}

    train.grads = {}

    def errors(params, ref) -> dict[str, float]:
        return {n: (params[n] - ref[n]).abs().max().item() for n in params}

    def grad_error(got, ref) -> float:
        """Largest gradient error relative to the tensor's largest gradient."""
        return max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item()
                   for n in ref)  # fmt: skip

    config = ParallelConfig(ensemble=world, noise_seed=7)
    sharded = train(torch.float32, config, build_groups(Layout(world, 1, world)))
    control = train(torch.float32, config, build_groups(Layout(world, 1, world)), unsynced=True)
    result = {}
    if rank == 0:
        exact, fp32 = train(torch.float64), train(torch.float32)
        g = train.grads
        g_exact, g_fp32 = g[(torch.float64, False, False)], g[(torch.float32, False, False)]
        g_ref = grad_error(g_fp32, g_exact)
        # the first step's gradients: no AdamW normalisation between them and the comparison
        # (AdamW moves a parameter whose gradient is rounding noise by ~lr, whatever its size)
        grads = {"max_rel_error": grad_error(g[(torch.float32, False, True)], g_exact),
                 "fp32_reference_rel_error": g_ref,
                 "unsynced_control_rel_error": grad_error(g[(torch.float32, True, True)], g_exact)}  # fmt: skip
        # tolerance: 4 x the fp32 reference's own error plus one ulp; the control must be off by
        # more than 10 tolerances for the check to discriminate
        g_tol = 4 * g_ref + torch.finfo(torch.float32).eps
        grads["tolerance"] = g_tol
        grads["passed"] = bool(grads["max_rel_error"] <= g_tol
                               and grads["unsynced_control_rel_error"] > 10 * g_tol)  # fmt: skip
        ref = errors(fp32, exact)
        ref_err = max(ref.values())
        scale = max(p.abs().max().item() for p in exact.values())
        tol = 4 * ref_err + torch.finfo(torch.float32).eps * scale
        err = max(errors(sharded, exact).values())
        start = build_model(graph, mcfg, device, torch.float64)[0].state_dict()
        moved = errors(exact, start)
        worst = sorted(ref, key=ref.get, reverse=True)[:3]
        result = {"ranks": world, "members": args.members, "steps": args.check_steps,
                  "max_param_error": err, "tolerance": tol, "fp32_reference_error": ref_err,
                  "sharded_vs_fp32_reference": max(errors(sharded, fp32).values()),
                  "unsynced_control_error": max(errors(control, exact).values()),
                  "parameters_moved": max(moved.values()),
                  "worst_reference_tensors": {n: [ref[n], moved[n]] for n in worst},
                  "passed": bool(err <= tol and max(moved.values()) > 10 * tol),
                  "first_step_gradients": grads}  # fmt: skip
        print({"check": result}, flush=True)
    if world > 1:
        dist.barrier()
    return result


def main() -> None:
    args = parse()
    distributed = "RANK" in os.environ
    cuda = torch.cuda.is_available() and not args.tiny
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.members % world:
        raise SystemExit(f"--members={args.members} does not split over {world} ranks")
    if args.check_only:  # the check builds its own graph and model
        graph = mcfg = None
    elif args.tiny:
        graph = build_graph(TINY_GRAPH)
        mcfg = ModelConfig(num_channels=32, num_heads=4, noise_channels=8,
                           ensemble_members=args.members)  # fmt: skip
    else:
        spec = yaml.safe_load((ROOT / "conf" / "graph" / f"{args.graph}.yaml").read_text())
        if rank == 0:  # one build, cached for the other ranks
            graph = load_or_build(spec, args.graph_cache)
        if distributed:
            dist.barrier()
        if rank != 0:
            graph = load_or_build(spec, args.graph_cache)
        policy = args.checkpoint
        mcfg = ModelConfig(num_channels=1024, num_heads=16, processor_layers=16, mlp_ratio=4,
                           trainable_edge_features=8, attention_backend="triton",
                           checkpoint_encoder=policy, checkpoint_processor=policy,
                           checkpoint_decoder=policy, noise_channels=16,
                           ensemble_members=args.members)  # fmt: skip
    began = time.perf_counter()
    rows = [] if args.check_only else throughput(args, graph, mcfg, device, world, rank)
    timed = time.perf_counter() - began
    checked = check(args, build_graph(TINY_GRAPH), device, world, rank) if world > 1 else {}
    if rank == 0:
        speedup = (rows[-1]["member_samples_per_s"] / rows[0]["member_samples_per_s"]
                   if len(rows) > 1 else 1.0)  # fmt: skip
        summary = {"rows": rows, "speedup": round(speedup, 3), "check": checked,
                   "throughput_wall_s": round(timed, 1)}  # fmt: skip
        print(json.dumps({"speedup": summary["speedup"], "check_passed": checked.get("passed")}))
        if rows and not args.tiny:
            append_rows("ensemble.csv", rows)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(summary, indent=1))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
