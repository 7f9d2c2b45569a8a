"""15-day forecast rollouts: seconds per step, total time and peak memory, with and without
writing every field to zarr and with and without CUDA-graph capture of the step.

    PYTHONPATH=src python profiling/bench_forecast.py                       # o96_l6 and o320_l7
    PYTHONPATH=src python profiling/bench_forecast.py --graphs o96_l6 --variants plain,graphs
    PYTHONPATH=src torchrun --nproc-per-node 2 profiling/bench_forecast.py --model-parallel 2
    PYTHONPATH=src python profiling/bench_forecast.py --tiny                # CPU check, seconds

The rollout is jobs.forecast's own (:class:`squall.train.forecast.Rollout`, ``ModelStep`` and
``FieldWriter``): inference mode, bf16 autocast on a GPU, the truth copied to the device one
step at a time, every step's full-grid fields gathered, scored and (``zarr`` variants) handed to
the background writer. Weights are random (time does not depend on them), inputs are random
normalised fields (never zeros), all ``--vars`` variables prognostic. Before each variant's
timed rollout, a 3-step rollout warms up (Triton autotuning, the CUDA-graph capture, allocator).

Variants: ``plain`` (no writing, eager), ``zarr`` (every field written to a zarr store under
``--zarr-dir``, local disk by default), ``graphs`` (step captured into a CUDA graph), and
``graphs+zarr``. ``s_per_step`` is the median device time of a step (CUDA events), ``total_s``
the wall time of the whole rollout until the last field is on disk; ``write_overhead_pct``
compares a ``zarr`` variant's total with the variant without writing.
Appends one row per (graph, variant) to profiling/results/forecast.csv as soon as it is measured.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, append_rows, machine_info  # noqa: E402
from _step import load_graph  # noqa: E402

from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.parallel.parallelize import ParallelConfig, parallelize  # noqa: E402
from squall.train.forecast import ModelStep, Rollout, StepClock, autocast_dtype  # noqa: E402
from squall.train.forecast_store import FieldWriter, create_store  # noqa: E402
from squall.train.loop import VariableLayout  # noqa: E402

VARIANTS = ("plain", "zarr", "zarr-lz4", "zarr-zstd", "graphs", "graphs+zarr")
#: Compression of each writing variant's store (forecast.compression).
COMPRESSION = {"zarr": "none", "zarr-lz4": "lz4", "zarr-zstd": "zstd", "graphs+zarr": "none"}
WARMUP_STEPS = 3  # autotuning and capture happen in the first; 3 leave the allocator settled


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--graphs", default="o96_l6,o320_l7")
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vars", type=int, default=100)
    p.add_argument("--edge-features", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="60 x 6 h = 15 days")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--backend", default=None, help="attention backend (GPU: triton, CPU: torch)")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp32")
    p.add_argument("--chunks", type=int, default=1, help="encoder/decoder pieces (caps memory)")
    p.add_argument("--model-parallel", type=int, default=1, help="ranks sharing the graph "
                   "(launch with torchrun --nproc-per-node N)")  # fmt: skip
    p.add_argument("--zarr-dir", default=None, help="where the zarr variants write (a temporary "
                   "folder on local disk by default; removed after each variant)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="o32_l4, 32 channels, 2 layers, 8 vars, "
                   "6 steps: checks the script on a CPU in seconds")  # fmt: skip
    p.add_argument("--csv", default="forecast.csv", help="results file in profiling/results/")
    args = p.parse_args()
    if args.tiny:
        args.graphs, args.channels, args.layers, args.heads = "o32_l4", 32, 2, 4
        args.vars, args.edge_features, args.steps = 8, 2, 6
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(args.variants) - set(VARIANTS))
    if bad:
        p.error(f"--variants {','.join(bad)}: choose from {','.join(VARIANTS)}")
    return args


def init() -> tuple[torch.device, int, int]:
    """The device, this rank and the world size (torchrun's environment, else one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return device, dist.get_rank(), world
    return torch.device("cuda" if cuda else "cpu"), 0, 1


def build(graph, args, device, model_parallel: int):
    """Random-weight model on ``device`` (sharded over ``model_parallel`` ranks or chunked when
    asked), its variable layout and this rank's grid rows (``None``: all)."""
    backend = args.backend or ("triton" if device.type == "cuda" else "torch")
    v = args.vars
    cfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                      processor_layers=args.layers, mlp_ratio=4,
                      trainable_edge_features=args.edge_features, attention_backend=backend)  # fmt: skip
    torch.manual_seed(0)
    model = GraphForecaster(graph, cfg, v, v, 2, [(i, i) for i in range(v)]).to(device).eval()
    torch.nn.init.normal_(model.head.weight, std=0.01)  # a non-trivial tendency each step
    rows = None
    if model_parallel > 1 or args.chunks > 1:
        model = parallelize(model, graph, ParallelConfig(model_parallel, "sfc",
                                                         chunks=args.chunks))  # fmt: skip
        rows = model.graph.data_ids if model_parallel > 1 else None
    everything = list(range(v))
    return model, VariableLayout(everything, everything, everything, everything), rows, backend


def run_variant(model, layout, rows, area, args, device, variant, zarr_root, rank) -> dict:
    """One timed rollout (after a warm-up one) of ``variant``; its numbers."""
    cuda = device.type == "cuda"
    dtype = autocast_dtype(args.precision, device)
    step = ModelStep(model, device, dtype, cuda_graphs="graphs" in variant)
    roll = Rollout(model, layout, area, rows, step)
    g, v = len(area), args.vars
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, g, v, generator=gen)
    # one truth field for every step: the rollout copies one step at a time, the bytes are the
    # same as distinct fields and the host holds one field instead of `steps`
    base = torch.randn(1, 1, g, v, generator=gen)
    if cuda:
        base = base.pin_memory()
    writes = "zarr" in variant and rank == 0

    def rollout(steps: int, path: Path | None):
        y = base.expand(1, steps, g, v)
        writer = None
        if path is not None:
            create_store(path, (1, steps, v, g), {"variables": [f"v{i}" for i in range(v)]},
                         COMPRESSION[variant])  # fmt: skip
            writer = FieldWriter(path, device)
        clock = StepClock(device)
        clock.mark()

        def on_step(s, field):  # field [members, G, V]: one member here
            if writer is not None:
                writer.put(0, s, field[0])
            clock.mark()

        if cuda:
            torch.cuda.synchronize(device)
        began, cpu_began = time.perf_counter(), time.process_time()
        roll.run(x, y, on_step)
        if writer is not None:
            writer.close()
        if cuda:
            torch.cuda.synchronize(device)
        total, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        steps_s = clock.intervals([(i, i + 1) for i in range(steps)])
        return total, cpu, steps_s, writer

    rollout(WARMUP_STEPS, None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    path = zarr_root / f"{variant.replace('+', '_')}.zarr" if writes else None
    try:
        total, cpu, steps_s, writer = rollout(args.steps, path)
        if writer is not None:
            store_gb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    finally:
        if path is not None and path.exists():
            shutil.rmtree(path)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # fmt: skip
    row = {"variant": variant, "cuda_graph": step.graph is not None,
           "s_per_step": round(statistics.median(steps_s), 5),
           "s_per_step_p90": round(float(np.percentile(steps_s, 90)), 5),
           "total_s": round(total, 3), "cpu_s": round(cpu, 3), "peak_GiB": round(peak, 3),
           "peak_kind": "cuda_allocated" if cuda else "host_rss",
           "write_wait_s": round(writer.wait_s, 3) if writes else None,
           "zarr_GB": round(store_gb, 3) if writes else None,
           "compression": COMPRESSION.get(variant, "")}  # fmt: skip
    return row


def main() -> None:
    args = parse()
    device, rank, world = init()
    if world % args.model_parallel:
        raise SystemExit(f"--model-parallel {args.model_parallel} does not divide {world} ranks")
    info = machine_info()
    zarr_root = Path(args.zarr_dir or tempfile.mkdtemp(prefix="squall-bench-forecast-"))
    zarr_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.graphs.split(","):
        graph = load_graph(name)
        model, layout, grid_rows, backend = build(graph, args, device, args.model_parallel)
        area = torch.from_numpy(graph.nodes["data"].area.astype(np.float32)).to(device)
        results = {}
        for variant in args.variants:
            row = run_variant(model, layout, grid_rows, area, args, device, variant, zarr_root,
                              rank)  # fmt: skip
            results[variant] = row
            plain = results.get("graphs" if variant.startswith("graphs") else "plain")
            if "zarr" in variant and plain is not None:
                row["write_overhead_pct"] = round(100 * (row["total_s"] / plain["total_s"] - 1), 2)
            full = {**info, "graph": name, "data_nodes": len(area), "channels": args.channels,
                    "layers": args.layers, "heads": args.heads, "vars": args.vars,
                    "steps": args.steps, "backend": backend, "precision": args.precision,
                    "chunks": args.chunks, "model_parallel": args.model_parallel, "ranks": world,
                    **row}  # fmt: skip
            rows.append(full)
            if rank == 0:  # row by row: a run cut short by a time limit keeps what it measured
                append_rows(args.csv, [full])
                print(f"{name:>8} {variant:<12} {row['s_per_step'] * 1e3:9.2f} ms/step "
                      f"{row['total_s']:8.2f} s total {row['peak_GiB']:7.2f} GiB peak"
                      + (f"  write +{row['write_overhead_pct']:.1f} %"
                         if "write_overhead_pct" in row else "")
                      + ("  (CUDA graph)" if row["cuda_graph"] else ""), flush=True)  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.zarr_dir is None:
        shutil.rmtree(zarr_root, ignore_errors=True)
    if rank == 0:
        print(f"{len(rows)} rows -> {RESULTS / args.csv}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
