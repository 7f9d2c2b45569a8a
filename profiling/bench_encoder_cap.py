"""Training step of a stretched-grid model with its cutoff encoder capped and uncapped.

    PYTHONPATH=src python profiling/bench_encoder_cap.py --graph stretched_nordic \\
        --channels 1024 --layers 16 --heads 16

Builds the spec as shipped (``max_neighbours: 64``) and with ``max_neighbours: null``, prints the
encoder's edges and in-degree distribution for each, then times a whole training step (forward
in bf16 autocast on a GPU, MSE, backward, AdamW; random normalised inputs of ``--vars`` variables,
two input steps, batch 1) and its peak memory. Rows go to profiling/results/encoder_cap.csv.
On a CPU (no GPU visible) it runs in fp32 with the wall clock and the process's peak RSS: a
check that the script works, not a measurement to quote.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.graphs import build_graph  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_fn(graph, args, device):
    cfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                      processor_layers=args.layers, mlp_ratio=4,
                      trainable_edge_features=args.edge_features)  # fmt: skip
    torch.manual_seed(0)
    v = args.vars
    model = GraphForecaster(graph, cfg, v, v, 2, [(i, i) for i in range(v)]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(1, 2, len(graph.nodes["data"]), v, device=device)
    y = torch.randn(1, len(graph.nodes["data"]), v, device=device)
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = (model(x).float() - y).square().mean()
        loss.backward()
        opt.step()

    return step


def time_step(step, device, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds per step after ``warmup`` steps, and peak memory (GiB) over the timed ones."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        return times, torch.cuda.max_memory_allocated() / 2**30
    return times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--graph", default="stretched_nordic")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vars", type=int, default=100)
    p.add_argument("--edge-features", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = yaml.safe_load((ROOT / "conf" / "graph" / f"{args.graph}.yaml").read_text())
    info = machine_info()
    rows = []
    for label, cap in (("capped", spec["edges"]["encoder"].get("max_neighbours", 64)),
                       ("uncapped", None)):  # fmt: skip
        spec["edges"]["encoder"]["max_neighbours"] = cap
        graph = build_graph(spec)
        print(f"{label}: {graph.in_degree_report()}", flush=True)
        enc = graph.edges["encoder"]
        times, peak = time_step(step_fn(graph, args, device), device, args.warmup, args.steps)
        row = {"graph": args.graph, "encoder": label, "max_neighbours": cap,
               "encoder_edges": enc.num_edges, "in_degree_max": int(enc.in_degree().max()),
               "channels": args.channels, "layers": args.layers, "heads": args.heads,
               "vars": args.vars, "device": device.type,
               "step_ms_median": round(statistics.median(times) * 1e3, 1),
               "step_ms_min": round(min(times) * 1e3, 1),
               "peak_GiB": round(peak, 3), **info}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        append_rows("encoder_cap.csv", rows)
    print(f"\n{'encoder':<10}{'edges':>10}{'deg max':>9}{'ms/step':>10}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['encoder']:<10}{r['encoder_edges']:>10,}{r['in_degree_max']:>9}"
              f"{r['step_ms_median']:>10}{r['peak_GiB']:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
