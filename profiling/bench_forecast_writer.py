"""Where the host time of writing forecast fields goes, per field, on this machine's CPU.

    PYTHONPATH=src python profiling/bench_forecast_writer.py                  # o96 and o320 sizes
    PYTHONPATH=src python profiling/bench_forecast_writer.py --grids 40320 --fields 4

One field is ``--vars`` float32 variables on ``G`` grid points (o96: 40,320; o320: 421,120),
handed over as the rollout has it, ``[G, V]`` normalised. Stages, seconds per field (best of
``--repeat``):

* ``denormalise_host``, ``transpose_host``: what the writer thread did before the layout moved to
  the device (``x * scale + offset`` into a new tensor, ``[G, V] -> [V, G]``);
* ``zarr_per_variable_<codec>``: zarr's API writing one ``[V, G]`` field as V chunks of one
  variable (the earlier layout) or ``zarr_one_chunk_<codec>`` as one chunk;
* ``writer_<compression>``: :class:`squall.train.forecast_store.FieldWriter` end to end (from
  the first ``put`` until the last field is on disk) per field, from CPU tensors (so with the
  denormalisation and layout on the host; on a GPU they run on the device), with
  ``gil_free_pct``: how much of
  a pure-Python loop's speed the rollout's thread keeps while the writer works (100: the writer
  never holds Python's lock), and ``ratio`` (raw bytes over stored bytes).

Random normal fields barely compress (ratio about 1.1): the Blosc rows are the cost of
compression on incompressible data, and weather fields compress better at about the same speed.
Rows go to profiling/results/forecast_writer.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.data.normalise import Normaliser  # noqa: E402
from squall.train.forecast_store import COMPRESSIONS, FieldWriter, create_store  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def python_rate(seconds: float, stop: threading.Event | None = None) -> float:
    """Iterations per second of a pure-Python loop (it needs Python's lock all the time)."""
    n, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds and not (stop is not None and stop.is_set()):
        for _ in range(1000):
            n += 1
    return n / (time.perf_counter() - began)


def stages(grid: int, args, root: Path) -> list[dict]:
    import numcodecs
    import zarr

    v = args.vars
    gen = torch.Generator().manual_seed(0)
    field = torch.randn(grid, v, generator=gen)
    norm = Normaliser([f"v{i}" for i in range(v)], torch.randn(v, generator=gen),
                      torch.rand(v, generator=gen) + 0.5)  # fmt: skip
    rows = [("denormalise_host", best(lambda: norm.denormalise(field), args.repeat), None, None)]
    host = norm.denormalise(field)
    rows.append(("transpose_host",
                 best(lambda: np.ascontiguousarray(host.numpy().T), args.repeat), None, None))  # fmt: skip
    layout = np.ascontiguousarray(host.numpy().T)
    for name, spec in (("none", None), ("lz4", COMPRESSIONS["lz4"])):
        codec = None if spec is None else numcodecs.Blosc(spec[0], spec[1], numcodecs.Blosc.SHUFFLE)
        for label, chunk_vars in (("per_variable", 1), ("one_chunk", v)):
            path = root / f"{label}_{name}.zarr"
            group = zarr.open_group(str(path), mode="w", zarr_format=2)
            array = group.create_array("data", shape=(args.repeat, v, grid),
                                       chunks=(1, chunk_vars, grid), dtype="float32",
                                       compressors=codec)  # fmt: skip
            slot = iter(range(args.repeat))
            seconds = best(lambda a=array, s=slot: a.__setitem__(next(s), layout), args.repeat)
            rows.append((f"zarr_{label}_{name}", seconds, None, None))
            shutil.rmtree(path)
    for compression in COMPRESSIONS:
        alone = python_rate(0.5)  # just before: the host's clock moves between rows
        path = root / f"writer_{compression}.zarr"
        create_store(path, (1, args.fields, v, grid), {}, compression)
        writer = FieldWriter(path, torch.device("cpu"), norm, queue_size=args.fields)
        fields = [torch.randn(grid, v, generator=gen) for _ in range(args.fields)]
        stop, rates = threading.Event(), []
        loop = threading.Thread(target=lambda r=rates, e=stop: r.append(python_rate(60, e)))
        began = time.perf_counter()
        loop.start()
        for s, f in enumerate(fields):
            writer.put(0, s, f)
        writer.close()
        seconds = (time.perf_counter() - began) / args.fields
        stop.set()
        loop.join()
        stored = sum(p.stat().st_size for p in (path / "data").iterdir() if p.name[0] != ".")
        ratio = args.fields * grid * v * 4 / stored
        rows.append((f"writer_{compression}", seconds, round(100 * rates[0] / alone, 1),
                     round(ratio, 3)))  # fmt: skip
        shutil.rmtree(path)
    return [{"grid": grid, "vars": v, "field_MB": round(grid * v * 4 / 1e6, 2), "stage": stage,
             "s_per_field": round(seconds, 5), "GBps": round(grid * v * 4 / seconds / 1e9, 3),
             "gil_free_pct": gil, "ratio": ratio} for stage, seconds, gil, ratio in rows]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="40320,421120", help="grid points (o96, o320)")
    p.add_argument("--vars", type=int, default=100)
    p.add_argument("--fields", type=int, default=6, help="fields through the writer per row")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (a temporary folder by default)")
    p.add_argument("--csv", default="forecast_writer.csv", help="results file in results/")
    args = p.parse_args()
    torch.set_num_threads(1)  # the writer's host work is one thread's per field
    root = Path(args.dir or tempfile.mkdtemp(prefix="squall-bench-writer-"))
    root.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    try:
        for grid in (int(g) for g in args.grids.split(",")):
            rows = [{**info, **row} for row in stages(grid, args, root)]
            append_rows(args.csv, rows)
            for r in rows:
                extra = (f"  Python keeps {r['gil_free_pct']:5.1f} %  ratio {r['ratio']:.2f}"
                         if r["gil_free_pct"] is not None else "")  # fmt: skip
                print(f"{grid:>8} {r['stage']:<24} {r['s_per_field'] * 1e3:9.1f} ms/field "
                      f"{r['GBps']:7.2f} GB/s{extra}", flush=True)  # fmt: skip
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
