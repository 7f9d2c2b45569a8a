"""Where a training step's GPU time goes: torch.profiler over a few steps, kernels by category.

    PYTHONPATH=src python profiling/profile_step.py --graph o96_l6 --backend torch --checkpoint off

Categories come from kernel names: matrix products (cuBLAS/CUTLASS/nvjet GEMMs), attention
(squall's Triton kernels, segment reductions, gathers and scatters of the reference), layer norm,
optimiser (multi-tensor / fused Adam), communication (NCCL), and the rest as elementwise (activations,
adds, dtype casts, copies). Idle is the step's wall time minus the union of kernel intervals. The
floor is the model's analytic FLOPs x 3 over the bf16 matrix rate measured in the same process.
Peak memory is torch's allocator peak over the profiled steps. Prints the table and appends rows to
profiling/results/step_breakdown.csv.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402
from _step import add_model_args, load_graph, make_step, matmul_tflops  # noqa: E402

from squall.kernels.gt_attention import kernel_design  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [
    ("communication", re.compile(r"nccl", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("attention", re.compile(r"_fwd_kernel|_bwd_dst_kernel|_bwd_src_kernel|_dw_chunk|_sum_chunks|segment_reduce|"
                             r"index_select|indexselect|indexfunc|scatter|index_add|gather|indexing_backward", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|cublas|wgmma", re.I)),
    ("norm", re.compile(r"layer_norm|layernorm", re.I)),
]  # fmt: skip


def categorise(name: str) -> str:
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "elementwise"


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def main():
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--backend", default="torch")
    p.add_argument("--checkpoint", default="off", help="as bench_step.py")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    graph = load_graph(args.graph)
    model, step = make_step(graph, args, args.backend, args.checkpoint)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("squall::step"):
                step()
                torch.cuda.synchronize()  # the CPU range then spans the step's GPU work too
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    steps = [
        e for e in events if e.get("name") == "squall::step" and e.get("cat") == "user_annotation"
    ]
    lo, hi = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
    kernels = [e for e in events if e.get("cat") == "kernel" and lo <= e["ts"] <= hi]
    wall_us = hi - lo  # steps run back to back; the annotation may appear once per thread
    by_cat = defaultdict(float)
    for k in kernels:
        by_cat[categorise(k["name"])] += k["dur"]
    busy = union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    n = args.steps
    rate = matmul_tflops()
    flops = 3 * model.flops_per_sample()
    floor_ms = flops / (rate * 1e12) * 1e3
    step_ms = wall_us / n / 1e3
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    info = machine_info()
    rows = []
    order = ["matmul", "attention", "norm", "elementwise", "optimizer", "communication"]
    print(f"{info['gpu']}, {args.graph}, {args.channels} ch x {args.layers} layers, backend {args.backend}, "
          f"checkpoint {args.checkpoint}: {step_ms:.1f} ms/step, floor {floor_ms:.1f} ms ({step_ms / floor_ms:.2f}x), "
          f"peak {peak_gib:.2f} GiB (kernels: {kernel_design()})")  # fmt: skip
    print(f"{'category':<14}{'ms/step':>10}{'share':>8}")
    for cat in [*order, "idle"]:
        ms = (wall_us - busy) / n / 1e3 if cat == "idle" else by_cat.get(cat, 0.0) / n / 1e3
        print(f"{cat:<14}{ms:>10.1f}{ms / step_ms:>8.1%}")
        rows.append({**info, "graph": args.graph, "channels": args.channels, "layers": args.layers,
                     "backend": args.backend, "checkpoint": args.checkpoint, "compile": args.compile, "category": cat,
                     "ms_per_step": round(ms, 2), "share": round(ms / step_ms, 4),
                     "step_ms": round(step_ms, 1), "floor_ms": round(floor_ms, 1),
                     "matmul_TFLOPs": round(rate, 1), "peak_GiB": round(peak_gib, 2),
                     "kernel_design": kernel_design()})  # fmt: skip
    top = sorted(((d, k) for k, d in _per_kernel(kernels).items()), reverse=True)[:12]
    print("\nlargest kernels (ms/step):")
    for dur, name in top:
        print(f"  {dur / n / 1e3:8.2f}  {categorise(name):<12} {name[:90]}")
    append_rows("step_breakdown.csv", rows)


def _per_kernel(kernels) -> dict[str, float]:
    out = defaultdict(float)
    for k in kernels:
        out[k["name"]] += k["dur"]
    return out


if __name__ == "__main__":
    main()
