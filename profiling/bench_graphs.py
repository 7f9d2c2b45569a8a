"""Graph build times: build each spec from scratch (no cache) and time it, stage by stage.

    python profiling/bench_graphs.py [o96_l6 o320_l7 o1280_l8 ...]
    python profiling/bench_graphs.py o1280_l8 --no-save --profile out/ --compare-leggauss

The search path is the default one (the GPU when there is one, else scipy KD-trees);
``SQUALL_GRAPH_SEARCH=scipy|cpu|cuda`` picks another (column ``search``). Each graph is built
once as a warm-up (CUDA context, Triton kernels compiled and tuned), then the lru caches of the
node builders (Gaussian latitudes, icosahedral refinement) are cleared and each of ``--repeats``
timed builds runs cold (the median is reported, column ``build_s_all`` has every one), as a first build in a fresh process would apart from the warm GPU. Columns ``t_<stage>``
are the build's own stage seconds (``graph.meta["build_timings_s"]``: node sets, then search and
sort+attributes of each edge set). ``--profile DIR`` writes a cProfile table of one more build
per graph; ``--compare-leggauss`` builds each graph again with numpy's ``leggauss`` latitudes
(the previous implementation) and reports whether every edge set is the same. Prints a table
and appends rows to profiling/results/graph_build.csv (or ``--csv``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info, write_rows  # noqa: E402

from squall.graphs import build_graph, grids, load_graph, save_graph  # noqa: E402
from squall.graphs.search import search_device  # noqa: E402
from squall.graphs.store import to_plain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_spec(name: str) -> dict:
    return to_plain(OmegaConf.load(ROOT / "conf" / "graph" / f"{name}.yaml"))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clear_caches() -> None:
    """Forget the node builders' cached results, so that the next build computes them."""
    grids.icosahedral_levels.cache_clear()
    grids._gauss_legendre_half.cache_clear()


def timed_build(spec: dict):
    """A cold build (caches cleared) and its wall seconds."""
    clear_caches()
    _sync()
    start = time.perf_counter()
    graph = build_graph(spec)
    _sync()
    return graph, time.perf_counter() - start


def leggauss_latitudes(n: int):
    """The previous :func:`squall.graphs.grids.gaussian_latitudes`: numpy's dense eigensolver."""
    x, w = np.polynomial.legendre.leggauss(2 * n)
    return np.arcsin(x[::-1]), w[::-1]


def compare_leggauss(spec: dict, graph) -> dict:
    """Build ``spec`` with leggauss latitudes; whether each edge set equals ``graph``'s, and how
    far the grid coordinates and area weights moved."""
    current = grids.gaussian_latitudes
    grids.gaussian_latitudes = leggauss_latitudes
    try:
        start = time.perf_counter()
        old = build_graph(spec)
        seconds = time.perf_counter() - start
    finally:
        grids.gaussian_latitudes = current
    out = {"leggauss_build_s": round(seconds, 2)}
    for name, nodes in graph.nodes.items():
        a, b = nodes.latlon, old.nodes[name].latlon
        ulps = np.abs(a - b) / np.spacing(np.abs(b).clip(min=np.finfo(np.float64).tiny))
        out[f"{name}_latlon_max_ulps"] = float(ulps.max())
        out[f"{name}_latlon_points_changed"] = int((a != b).any(axis=1).sum())
        out[f"{name}_area_max_rel"] = float(np.abs(nodes.area / old.nodes[name].area - 1).max())
    for name, e in graph.edges.items():
        o = old.edges[name]
        same = np.array_equal(e.colptr, o.colptr) and np.array_equal(e.row, o.row)
        out[f"{name}_same_edges"] = same
        if same:
            out[f"{name}_attrs_max_diff"] = float(np.abs(e.attrs - o.attrs).max())
    return out


def profile_build(spec: dict, path: Path) -> None:
    """cProfile of one cold build: the 40 largest functions by own and by cumulative time."""
    clear_caches()
    prof = cProfile.Profile()
    prof.enable()
    build_graph(spec)
    _sync()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    for key in ("tottime", "cumulative"):
        text.write(f"\n==== sorted by {key} ====\n")
        stats.sort_stats(key).print_stats(40)
    path.write_text(text.getvalue())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graphs", nargs="*", default=["o96_l6", "o320_l7", "o1280_l8"])
    parser.add_argument("--no-warmup", action="store_true", help="time the first build")
    parser.add_argument("--repeats", type=int, default=1,
                        help="cold builds timed per graph (the median is reported)")  # fmt: skip
    parser.add_argument("--no-save", action="store_true", help="skip the save/load timing")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile tables here")
    parser.add_argument("--compare-leggauss", action="store_true",
                        help="also build with numpy leggauss latitudes and compare the edges")  # fmt: skip
    parser.add_argument("--csv", type=Path, default=None,
                        help="write the rows here instead of appending to results/graph_build.csv")  # fmt: skip
    args = parser.parse_args(argv)
    rows = []
    for name in args.graphs:
        spec = load_spec(name)
        if not args.no_warmup:
            build_graph(spec)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(args.repeats):
            runs.append(timed_build(spec))
        runs.sort(key=lambda r: r[1])
        graph, seconds = runs[len(runs) // 2]  # the median build and its stages
        all_seconds = ";".join(f"{r[1]:.3f}" for r in runs)
        del runs
        stats = graph.statistics()
        row = {
            **machine_info(),
            "graph": name,
            "search": str(search_device() or "scipy"),
            "warm_up": not args.no_warmup,
            "data_nodes": stats["nodes"]["data"],
            "hidden_nodes": stats["nodes"]["hidden"],
            **{f"{k}_edges": v["edges"] for k, v in stats["edges"].items()},
            "build_s": round(seconds, 3),
            "build_s_all": all_seconds,
            **{f"t_{k}": v for k, v in graph.meta["build_timings_s"].items()},
        }
        if torch.cuda.is_available():
            row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if not args.no_save:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                path = save_graph(graph, Path(tmp) / "g.npz")
                t1 = time.perf_counter()
                load_graph(path)
                row |= {"save_s": round(t1 - t0, 2), "load_s": round(time.perf_counter() - t1, 2),
                        "file_MB": round(path.stat().st_size / 1e6, 1)}  # fmt: skip
        edges = sum(v["edges"] for v in stats["edges"].values())
        print(f"{name:<12} data {row['data_nodes']:>10,} hidden {row['hidden_nodes']:>9,} "
              f"edges {edges:>11,}  build {seconds:7.3f} s ({row['search']}; all: {all_seconds})",
              flush=True)  # fmt: skip
        for stage, s in graph.meta["build_timings_s"].items():
            print(f"    {stage:<32} {s:8.3f} s")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            profile_build(spec, args.profile / f"{name}.prof.txt")
        if args.compare_leggauss:
            compared = compare_leggauss(spec, graph)
            row |= compared
            print("    vs leggauss latitudes:", compared, flush=True)
        rows.append(row)
        del graph
    if args.csv is not None:
        write_rows(args.csv, rows)
    else:
        append_rows("graph_build.csv", rows)
    return rows


if __name__ == "__main__":
    main()
