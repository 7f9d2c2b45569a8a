"""Sharded rollout (model_parallel=2) against the one-device rollout, fp32, same process pair.

    PYTHONPATH=src torchrun --nproc-per-node 2 profiling/check_sharded_forecast.py [graph] [steps]

Prints max |sharded - single| / max |single| per step (target 1e-6 on NCCL) and whether the
fields are bitwise equal. Random weights (seed 0) and inputs; the rollout is jobs.forecast's own
(:class:`squall.train.forecast.Rollout`), built as profiling/bench_forecast.py builds it.
"""

import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path("profiling").resolve()))
from _step import load_graph  # noqa: E402
from bench_forecast import build, init  # noqa: E402

from squall.train.forecast import ModelStep, Rollout  # noqa: E402

graph_name = sys.argv[1] if len(sys.argv) > 1 else "o96_l6"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
small = graph_name.startswith("o32")
args = Namespace(
    backend=None,
    vars=8 if small else 100,
    channels=32 if small else 1024,
    heads=4 if small else 16,
    layers=2 if small else 16,
    edge_features=8,
    chunks=1,
)
device, rank, world = init()
graph = load_graph(graph_name)
area = torch.from_numpy(graph.nodes["data"].area.astype("float32")).to(device)
g, v = len(area), args.vars
gen = torch.Generator().manual_seed(1)
x = torch.randn(1, 2, g, v, generator=gen)
y = torch.randn(1, steps, g, v, generator=gen)


def fields(model_parallel):
    model, layout, rows, backend = build(graph, args, device, model_parallel)
    out = []
    roll = Rollout(model, layout, area, rows, ModelStep(model, device, None, cuda_graphs=False))
    roll.run(x, y, lambda s, f: out.append(f[0].float().cpu().clone()))
    return out, backend


single, backend = fields(1)
sharded, _ = fields(world)
if rank == 0:
    worst = 0.0
    for s, (a, b) in enumerate(zip(single, sharded, strict=True)):
        rel = ((a - b).abs().max() / a.abs().max()).item()
        worst = max(worst, rel)
        print(f"step {s + 1}: max rel diff {rel:.2e}, bitwise {torch.equal(a, b)}")
    print(
        f"RESULT graph={graph_name} ranks={world} backend={backend} fp32 steps={steps} "
        f"worst_rel={worst:.2e} target=1e-6 {'met' if worst <= 1e-6 else 'missed'}"
    )
