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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402
from _step import add_model_args, load_graph, make_processor_step, make_step, matmul_tflops  # noqa: E402

from squall.kernels.gt_attention import kernel_design  # noqa: E402
from squall.planning.estimate import describe_checkpointing  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(step, warmup: int, steps: int) -> list[float]:
    """Seconds per call of ``step`` (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def time_step(graph, args, backend: str, checkpoint: str) -> dict:
    model, step = make_step(graph, args, backend, checkpoint)
    v = args.vars
    inputs_gib = torch.cuda.memory_allocated() / 2**30
    times = timed(step, args.warmup, args.steps)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    processor = timed(make_processor_step(model), args.warmup, args.steps)
    flops = 3 * model.flops_per_sample()
    row = {
        "graph": args.graph,
        "channels": args.channels,
        "layers": args.layers,
        "heads": args.heads,
        "vars": v,
        "backend": backend,
        "kernel_design": kernel_design() if backend == "triton" else "-",
        "checkpoint": checkpoint,
        "checkpoint_plan": describe_checkpointing(model.cfg).removeprefix("checkpointing: "),
        "compile": args.compile,
        "params_M": round(model.num_parameters() / 1e6, 2),
        "step_ms_median": round(median * 1e3, 1),
        "step_ms_min": round(min(times) * 1e3, 1),
        "peak_GiB": round(peak, 2),
        "processor_ms_median": round(statistics.median(processor) * 1e3, 1),
        "model_state_GiB": round(inputs_gib, 2),
        "model_TFLOP_per_step": round(flops / 1e12, 3),
        "achieved_TFLOPs": round(flops / median / 1e12, 1),
    }
    return row


def main():
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--backend", nargs="+", default=["torch"])
    p.add_argument(
        "--checkpoint",
        nargs="+",
        default=["off", "on"],
        help="off | on | none | mlp | full | budget:<GiB> (policies from the estimate)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    graph = load_graph(args.graph)
    info = machine_info()
    rate = matmul_tflops()
    print(f"{info['gpu']}: bf16 matmul {rate:.0f} TFLOP/s (8192^3, random data)", flush=True)
    rows = []
    for backend in args.backend:
        for ckpt in args.checkpoint:
            try:
                row = time_step(graph, args, backend, ckpt)
            except torch.OutOfMemoryError:
                row = {
                    "graph": args.graph,
                    "backend": backend,
                    "checkpoint": ckpt,
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
    print(f"\n{'backend':<8}{'ckpt':<12}{'compile':<8}{'ms/step':>9}{'proc ms':>9}{'peak GiB':>10}"
          f"{'TFLOP/s':>9}{'x floor':>8}  plan")  # fmt: skip
    for r in rows:
        print(
            f"{r['backend']:<8}{str(r['checkpoint']):<12}{str(args.compile):<8}{r['step_ms_median']!s:>9}"
            f"{r.get('processor_ms_median', '-')!s:>9}{r.get('peak_GiB', '-')!s:>10}"
            f"{r.get('achieved_TFLOPs', '-')!s:>9}{r.get('matmul_floor_ratio', '-')!s:>8}  {r.get('checkpoint_plan', '')}"
        )


if __name__ == "__main__":
    main()
