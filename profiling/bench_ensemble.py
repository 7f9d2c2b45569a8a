"""Ensemble training throughput: member-samples per second with the members of each sample on
one GPU or spread over the ranks of an ensemble group (squall.parallel.ensemble).

    PYTHONPATH=src python profiling/bench_ensemble.py --members 4                 # 4 on one GPU
    PYTHONPATH=src torchrun --nproc-per-node 2 profiling/bench_ensemble.py --members 4  # 2 per GPU
    PYTHONPATH=src python profiling/bench_ensemble.py --tiny --members 4          # CPU check
    PYTHONPATH=src torchrun --nproc-per-node 2 profiling/bench_ensemble.py --tiny --members 4

One training step is the ensemble loss's: every rank rolls out its ``members / ranks`` members of
``--batch`` samples (one step), the members are all-gathered for the afCRPS, backward sums the
gradients over the group, AdamW steps. The model is o96_ens's (1024 channels, 16 layers, 16
heads, triton attention, bf16 autocast, ``--checkpoint`` policy on every block) on ``--graph``;
``--tiny`` is a CPU-sized model on O8. Inputs are random normalised fields (never zeros).
``member_samples_per_s`` = members x batch / median step time after ``--warmup`` steps;
``gather_s`` is the median time of the member all-gather and ``memory_GiB`` the peak allocated
memory of rank 0. Appends one row to profiling/results/ensemble.csv (rank 0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402
from _step import load_graph  # noqa: E402

from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.parallel import ensemble as E  # noqa: E402
from squall.train.ensemble import fold_members, unfold_members  # noqa: E402
from squall.train.scores import afcrps  # noqa: E402

VARS_IN, VARS_OUT, INPUT_STEPS = 13, 7, 2  # the synthetic default: 6 prognostic + tp, 7 forcings


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--members", type=int, default=4, help="members per sample, all ranks")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out (autotuning)")
    p.add_argument("--checkpoint", default="mlp", help="none | mlp | full, every block")
    p.add_argument("--tiny", action="store_true", help="CPU-sized model on O8 (a check)")
    return p.parse_args()


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
    if args.tiny:
        from squall.graphs import build_graph

        graph = build_graph({"name": "o8_l2", "nodes": {"data": {"type": "grid", "grid": "O8"},
                             "hidden": {"type": "icosahedral", "level": 2}},
                             "edges": {"encoder": {"src": "data", "dst": "hidden", "type": "cutoff",
                                                   "factor": 0.8},
                                       "processor": {"src": "hidden", "dst": "hidden",
                                                     "type": "multiscale"},
                                       "decoder": {"src": "hidden", "dst": "data", "type": "knn",
                                                   "k": 3}}})  # fmt: skip
        cfg = ModelConfig(num_channels=32, num_heads=4, noise_channels=8,
                          ensemble_members=args.members)  # fmt: skip
    else:
        graph = load_graph(args.graph)
        policy = args.checkpoint
        cfg = ModelConfig(num_channels=1024, num_heads=16, processor_layers=16, mlp_ratio=4,
                          trainable_edge_features=8, attention_backend="triton",
                          checkpoint_encoder=policy, checkpoint_processor=policy,
                          checkpoint_decoder=policy, noise_channels=16,
                          ensemble_members=args.members)  # fmt: skip
    torch.manual_seed(0)
    model = GraphForecaster(graph, cfg, VARS_IN, VARS_OUT, INPUT_STEPS,
                            [(i, i) for i in range(6)]).to(device)  # fmt: skip
    from squall.parallel.parallelize import ParallelConfig, parallelize, single_process_groups

    parallelize(model, graph, ParallelConfig(), single_process_groups())  # checkpoint policies
    group = dist.group.WORLD if distributed else None
    E.apply_ensemble_parallel(model, group, seed=0)
    local = model.local_members
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = graph.nodes["data"].__len__()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, INPUT_STEPS, g, VARS_IN, device=device, generator=gen)
    y = torch.randn(args.batch, g, VARS_OUT, device=device, generator=gen)
    area = model.graph.area
    times, gathers = [], []

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for step in range(args.warmup + args.steps):
        sync()
        began = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = model(fold_members(x, local))
        ens = unfold_members(pred.float(), local)
        sync()
        g0 = time.perf_counter()
        ens = E.gather_members(ens, group) if group is not None else ens
        sync()
        gathered = time.perf_counter() - g0
        afcrps(ens, y, area).backward()
        optim.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
            gathers.append(gathered)
    step_s = statistics.median(times)
    row = {**machine_info(), "graph": "o8_l2" if args.tiny else args.graph,
           "members": args.members, "ranks": world, "members_per_rank": local,
           "batch": args.batch, "checkpoint": "none" if args.tiny else args.checkpoint,
           "step_s": round(step_s, 5), "gather_s": round(statistics.median(gathers), 5),
           "member_samples_per_s": round(args.members * args.batch / step_s, 3),
           "memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else 0,
           "steps": args.steps}  # fmt: skip
    if rank == 0:
        print(row, flush=True)
        if not args.tiny:
            append_rows("ensemble.csv", [row])
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
