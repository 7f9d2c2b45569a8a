"""Loss curves of the same training run with different attention backends (and fp32 for scale).

    PYTHONPATH=src python profiling/loss_curve.py --graph o96_l6 --steps 200 \
        --runs torch:bf16 triton:bf16 triton+compile+mlp:bf16 torch:fp32

A run is ``backend[+compile][+<checkpoint policy>]:precision`` (policies: none, mlp, full;
``+compile`` puts every block under torch.compile).

Every run starts from the same parameters and sees the same synthetic windows in the same order
(in-memory fields from ``squall.data.synthetic``: no zarr needed). The difference between the
``torch:bf16`` and ``torch:fp32`` curves is the bf16 noise of the reference; the triton curve
should sit within it. Writes per-step losses to profiling/results/loss_curve.csv and a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402
from _step import load_graph, model_config  # noqa: E402

from squall.data.synthetic import STATIC, TIME_FORCINGS, Synthetic, SyntheticSettings  # noqa: E402
from squall.models.forecaster import CHECKPOINT_POLICIES, GraphForecaster  # noqa: E402
from squall.parallel.parallelize import (  # noqa: E402
    ParallelConfig,
    parallelize,
    single_process_groups,
)  # fmt: skip
from squall.train.loop import Trainer, VariableLayout  # noqa: E402


def synthetic_windows(graph, num_times: int, device):
    """Normalised fields ``[T, G, V]`` and the variable roles of the default synthetic set."""
    settings = SyntheticSettings(num_times=num_times)
    fields = Synthetic(graph.nodes["data"], settings).fields(np.arange(num_times))
    names = list(settings.variables)
    data = np.stack([fields[v] for v in names], -1).astype(np.float32)  # [T, G, V]
    mean, std = data.mean((0, 1)), data.std((0, 1))
    data = (data - mean) / np.where(std > 0, std, 1.0)
    forcing = [i for i, v in enumerate(names) if v in STATIC or v in TIME_FORCINGS]
    roles = {"prognostic": [i for i, v in enumerate(names) if i not in forcing and v != "tp"],
             "forcing": forcing, "diagnostic": [names.index("tp")]}  # fmt: skip
    return torch.from_numpy(data).to(device), roles


def run(graph, data, roles, args, spec: str) -> tuple[list[float], float]:
    device = data.device
    layout = VariableLayout.from_roles(roles)
    options, precision = spec.split(":")
    backend, *extras = options.split("+")
    unknown = set(extras) - {"compile", *CHECKPOINT_POLICIES}
    if unknown:
        raise SystemExit(f"run {spec!r}: unknown options {sorted(unknown)}")
    policy = next((e for e in extras if e in CHECKPOINT_POLICIES), "none")
    torch.manual_seed(0)
    sizes = SimpleNamespace(channels=args.channels, heads=args.heads, layers=args.layers,
                            vars=len(layout.inputs), edge_features=8, compile="compile" in extras)  # fmt: skip
    cfg = model_config(graph, sizes, backend, policy)
    model = GraphForecaster(
        graph, cfg, len(layout.inputs), len(layout.outputs), 2, layout.residual
    ).to(device)
    parallelize(model, graph, ParallelConfig(), single_process_groups())  # policies, compile
    tcfg = SimpleNamespace(lr=args.lr, weight_decay=0.01, warmup_steps=10, max_steps=args.steps,
                           min_lr_ratio=0.1, precision=precision, grad_clip=1.0)  # fmt: skip
    trainer = Trainer(model, layout, tcfg, device, logger=None)
    order = np.random.default_rng(0).permutation(data.shape[0] - 2)
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        t = int(order[step % len(order)]) + 1
        batch = {"x": data[t - 1 : t + 1][None], "y": data[t + 1 : t + 2][None]}
        loss, _ = trainer.train_step(batch)
        losses.append(float(loss))
    seconds = (time.perf_counter() - start) / args.steps
    return losses, seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--times", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--runs", nargs="+", default=["torch:bf16", "triton:bf16", "torch:fp32"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph = load_graph(args.graph)
    data, roles = synthetic_windows(graph, args.times, device)
    curves, speed = {}, {}
    for spec in args.runs:
        curves[spec], speed[spec] = run(graph, data, roles, args, spec)
        print(f"{spec:<12} first {curves[spec][0]:.4f} last {curves[spec][-1]:.4f} "
              f"mean(last 20) {np.mean(curves[spec][-20:]):.4f}  {speed[spec] * 1e3:.1f} ms/step", flush=True)  # fmt: skip
    base = np.asarray(curves[args.runs[0]])
    info = machine_info()
    rows, summary = [], []
    for spec in args.runs[1:]:
        rel = np.abs(np.asarray(curves[spec]) - base) / np.abs(base)
        summary.append({**info, "graph": args.graph, "channels": args.channels, "layers": args.layers,
                        "steps": args.steps, "reference": args.runs[0], "run": spec,
                        "rel_diff_median": float(np.median(rel)), "rel_diff_max": float(rel.max()),
                        "rel_diff_last20_mean": float(rel[-20:].mean()),
                        "ms_per_step": round(speed[spec] * 1e3, 1),
                        "ms_per_step_reference": round(speed[args.runs[0]] * 1e3, 1)})  # fmt: skip
        print(
            f"{spec} vs {args.runs[0]}: relative loss difference median {np.median(rel):.2e}, "
            f"max {rel.max():.2e}, last-20 mean {rel[-20:].mean():.2e}"
        )
    for step in range(args.steps):
        rows.append({"git": info["git"], "gpu": info["gpu"], "graph": args.graph, "step": step + 1,
                     **{spec: curves[spec][step] for spec in args.runs}})  # fmt: skip
    append_rows("loss_curve_summary.csv", summary)
    append_rows("loss_curve.csv", rows)


if __name__ == "__main__":
    main()
