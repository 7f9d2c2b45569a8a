"""Whole training step of the forecaster on one GPU: forward, backward, AdamW.

    PYTHONPATH=src python profiling/bench_step.py --graph o96_l6 --channels 1024 --layers 16 \
        --heads 16 --backend torch --checkpoint off on

Random normalised inputs (never zeros) of ``--vars`` variables and two input steps, batch 1, bf16
autocast. Prints a table and appends rows to profiling/results/step.csv: median s/step, peak
memory, achieved TFLOP/s (analytic model FLOPs x 3 for forward + backward) against the bf16 matrix
rate measured in the same process.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.graphs import build_graph  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig, compile_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def time_step(graph, args, backend: str, checkpoint: bool) -> dict:
    cfg = ModelConfig(
        num_channels=args.channels, num_heads=args.heads, processor_layers=args.layers,
        mlp_ratio=4, trainable_edge_features=args.edge_features, attention_backend=backend,
        checkpoint_encoder=checkpoint, checkpoint_processor=checkpoint, checkpoint_decoder=checkpoint,
    )  # fmt: skip
    torch.manual_seed(0)
    v = args.vars
    model = GraphForecaster(graph, cfg, v, v, 2, [(i, i) for i in range(v)]).cuda()
    if args.compile:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(1, 2, model.graph.num_data, v, device="cuda")
    y = torch.randn(1, model.graph.num_data, v, device="cuda")
    inputs_gib = torch.cuda.memory_allocated() / 2**30

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(times)
    flops = 3 * model.flops_per_sample()
    row = {
        "graph": args.graph,
        "channels": args.channels,
        "layers": args.layers,
        "heads": args.heads,
        "vars": v,
        "backend": backend,
        "checkpoint": checkpoint,
        "params_M": round(model.num_parameters() / 1e6, 2),
        "step_ms_median": round(median * 1e3, 1),
        "step_ms_min": round(min(times) * 1e3, 1),
        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "model_state_GiB": round(inputs_gib, 2),
        "model_TFLOP_per_step": round(flops / 1e12, 3),
        "achieved_TFLOPs": round(flops / median / 1e12, 1),
    }
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vars", type=int, default=100)
    p.add_argument("--edge-features", type=int, default=8)
    p.add_argument("--backend", nargs="+", default=["torch"])
    p.add_argument("--checkpoint", nargs="+", default=["off", "on"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile every block")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    spec = yaml.safe_load((ROOT / "conf" / "graph" / f"{args.graph}.yaml").read_text())
    graph = build_graph(spec)
    info = machine_info()
    rate = matmul_tflops()
    print(f"{info['gpu']}: bf16 matmul {rate:.0f} TFLOP/s (8192^3, random data)", flush=True)
    rows = []
    for backend in args.backend:
        for ckpt in args.checkpoint:
            try:
                row = time_step(graph, args, backend, ckpt == "on")
            except torch.OutOfMemoryError:
                row = {
                    "graph": args.graph,
                    "backend": backend,
                    "checkpoint": ckpt == "on",
                    "step_ms_median": "OOM",
                }
                gc.collect()
                torch.cuda.empty_cache()
            row.update(info, matmul_TFLOPs=round(rate, 1))
            if isinstance(row.get("achieved_TFLOPs"), float):
                row["matmul_floor_ratio"] = round(
                    row["achieved_TFLOPs"] and rate / row["achieved_TFLOPs"], 2
                )
            rows.append(row)
            print(row, flush=True)
    append_rows("step.csv", rows)
    print(f"\n{'backend':<8}{'ckpt':<6}{'ms/step':>9}{'peak GiB':>10}{'TFLOP/s':>9}{'x floor':>8}")
    for r in rows:
        print(
            f"{r['backend']:<8}{str(r['checkpoint']):<6}{r['step_ms_median']!s:>9}{r.get('peak_GiB', '-')!s:>10}"
            f"{r.get('achieved_TFLOPs', '-')!s:>9}{r.get('matmul_floor_ratio', '-')!s:>8}"
        )


if __name__ == "__main__":
    main()
