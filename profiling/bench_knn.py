"""Neighbour search on the sphere: squall.graphs.search against GPU brute force and scipy KD-trees.

    python profiling/bench_knn.py                                  # one H200: O1280, l6/l8, o1280_l8
    python profiling/bench_knn.py --grid O320 --cutoff-level 7 --graph none \\
        --brute-queries 20000                                      # CPU-sized run

Cases (the graph builders' two searches at the size of the o1280_l8 graph):

* ``knn``: k = 3 nearest level-``--knn-level`` mesh nodes of every grid point (a decoder);
* ``cutoff``: every grid point within 0.6 x the largest nearest-neighbour spacing of the
  level-``--cutoff-level`` mesh of each mesh node (an encoder, as ``conf/graph/o1280_l8.yaml``).

Methods, timed in the same run: ``sphere`` (squall.graphs.search on the GPU when there is one,
else torch on the CPU; index build and the search from coordinates on the device; on CUDA with
banded sources the Triton kernels, checked equal to and timed against the torch path,
``SQUALL_SEARCH_KERNEL=0``), ``brute`` (torch
``cdist`` + ``topk``/threshold in float32 over blocks of queries, on the same device) and
``kdtree`` (scipy ``cKDTree`` with ``workers=-1``, the tree built inside the timing; radius
pairs from ``query_ball_point``; skipped where scipy is not installed). ``--repeats`` times the search (median after a warm-up), the
baselines once (brute force after a warm-up on 1,024 queries). ``--brute-queries`` times brute force on the first queries only and scales the
time to all of them (column ``timed_fraction``). Then the whole ``--graph`` build (search,
CSC sort and attributes) on the default path and with ``SQUALL_GRAPH_SEARCH=scipy``.

Prints a table and appends rows to profiling/results/knn.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

try:
    from scipy.spatial import cKDTree
except ImportError:  # the GPU machine has no scipy: its KD-tree rows are skipped, said so
    cKDTree = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.graphs import build_graph, edges, grids, search  # noqa: E402
from squall.graphs.store import to_plain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Float32 distance matrix elements per brute-force block: 2^30 (4 GiB) keeps an H200 busy and
#: leaves room for topk's temporaries; 2^24 on the CPU.
BRUTE_BLOCK = {"cuda": 1 << 30, "cpu": 1 << 24}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=True):
    """Median seconds of ``repeats`` calls (after one warm-up call), and the last result."""
    out = fn() if warmup else None
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def brute_knn(src, dst, k):
    """k nearest by float32 ``cdist`` + ``topk`` over blocks of queries (``[N, 3]`` tensors)."""
    block = max(1, BRUTE_BLOCK[src.device.type] // len(src))
    out = []
    for lo in range(0, len(dst), block):
        d = torch.cdist(dst[lo : lo + block], src)
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out)


def brute_radius(src, dst, r):
    """Number of pairs within ``r`` by float32 ``cdist`` over blocks of queries."""
    block = max(1, BRUTE_BLOCK[src.device.type] // len(src))
    found = torch.zeros((), dtype=torch.int64, device=src.device)
    for lo in range(0, len(dst), block):
        found += (torch.cdist(dst[lo : lo + block], src) <= r).sum()
    return int(found)


def kdtree_knn(src_xyz, dst_xyz, k):
    return cKDTree(src_xyz).query(dst_xyz, k=k, workers=-1)[1]


def kdtree_radius(src_xyz, dst_xyz, r):
    """Pairs within ``r`` as index arrays; ``query_ball_point`` is the parallel KD-tree radius
    query (``sparse_distance_matrix``, the scipy graph path, runs on one core)."""
    found = cKDTree(src_xyz).query_ball_point(dst_xyz, r, workers=-1, return_sorted=False)
    counts = np.fromiter((len(f) for f in found), np.int64, len(found))
    src = np.fromiter((i for f in found for i in f), np.int64, int(counts.sum()))
    return len(src)


def run_case(case, src, dst, device, args, k=None, r=None):
    """Rows for one case: sphere, brute, kdtree."""
    src_xyz, dst_xyz = src.xyz, dst.xyz
    base = {"case": case, "src": src.name, "dst": dst.name, "num_src": len(src),
            "num_dst": len(dst), "k": k or "", "radius": f"{r:.6g}" if r else ""}  # fmt: skip
    rows = []

    # Both GPU methods start from coordinates already on the device (float64 for the exact
    # search, float32 for brute force); the KD-tree from host arrays.
    on_device = [torch.from_numpy(a).to(device) for a in (src.latlon, src_xyz, dst.latlon, dst_xyz)]
    src_ll, src_x, dst_ll, dst_x = on_device

    def sphere():
        index = search.SphereIndex.build(src_ll, device, xyz=src_x)
        if k is not None:
            return search.knn(index, dst_ll, k, dst_x)[0]
        return search.radius(index, dst_ll, r, query_xyz=dst_x)[1]

    def full_result():
        index = search.SphereIndex.build(src_ll, device, xyz=src_x)
        if k is not None:
            return search.knn(index, dst_ll, k, dst_x)
        return search.radius(index, dst_ll, r, query_xyz=dst_x)

    # The Triton kernels (banded sources on CUDA) against the torch path on the same device:
    # equal results first, then the torch path's time (the search before the kernels).
    kernel = device.type == "cuda" and search.use_kernel(
        search.SphereIndex.build(src_ll, device, xyz=src_x), k
    )
    torch_seconds = equal = None
    if kernel:
        got_kernel = full_result()
        os.environ["SQUALL_SEARCH_KERNEL"] = "0"
        try:
            want = full_result()
            equal = all(torch.equal(a, b) for a, b in zip(got_kernel, want, strict=True))
            print(f"{case}: kernel result equal to the torch path's: {equal}", flush=True)
            del got_kernel, want
            torch_seconds, _ = timed(sphere, device, args.repeats)
        finally:
            os.environ.pop("SQUALL_SEARCH_KERNEL", None)

    seconds, got = timed(sphere, device, args.repeats)
    block_rows = []
    if kernel:
        from squall.kernels import sphere_search

        default = sphere_search.BLOCK
        for block in args.kernel_blocks:  # queries per program (one per lane)
            sphere_search.BLOCK = block
            try:
                t, _ = timed(sphere, device, args.repeats)
            finally:
                sphere_search.BLOCK = default
            block_rows.append({**base, "method": f"sphere kernel BLOCK={block} ({device.type})",
                               "seconds": t, "edges": got.numel(), "timed_fraction": 1.0})  # fmt: skip
    if args.profile_search:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            sphere()
            _sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        Path(f"{args.profile_search}.{case}.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=40)
        )
    edges_found = got.numel()
    rows.append({**base, "method": f"sphere {'kernel' if kernel else 'torch'} ({device.type})",
                 "seconds": seconds, "edges": edges_found, "timed_fraction": 1.0,
                 "equal_to_torch_path": "" if equal is None else equal})  # fmt: skip
    rows += block_rows
    if torch_seconds is not None:
        rows.append({**base, "method": f"sphere torch ({device.type})", "seconds": torch_seconds,
                     "edges": edges_found, "timed_fraction": 1.0})  # fmt: skip

    n_brute = min(len(dst), args.brute_queries or len(dst))
    src32, part32 = src_x.float(), dst_x[:n_brute].float()
    if k is not None:
        brute_knn(src32, part32[:1024], k)  # warm-up: cuBLAS and caching allocator
        seconds, _ = timed(lambda: brute_knn(src32, part32, k), device, 1, warmup=False)
    else:
        brute_radius(src32, part32[:1024], r)
        seconds, _ = timed(lambda: brute_radius(src32, part32, r), device, 1, warmup=False)
    rows.append({**base, "method": f"brute cdist+topk fp32 ({device.type})",
                 "seconds": seconds * len(dst) / n_brute, "edges": "",
                 "timed_fraction": round(n_brute / len(dst), 4)})  # fmt: skip

    cpu = torch.device("cpu")
    if cKDTree is None:
        print(f"{case}: scipy not installed here: no cKDTree row", flush=True)
    elif k is not None:
        seconds, tree = timed(lambda: kdtree_knn(src_xyz, dst_xyz, k), cpu, 1, warmup=False)
        same = np.sort(tree.reshape(len(dst), k), 1) == np.sort(got.cpu().numpy(), 1)
        agree = float(same.all(1).mean())
        found = tree.size
    else:
        seconds, found = timed(lambda: kdtree_radius(src_xyz, dst_xyz, r), cpu, 1, warmup=False)
        agree = float(found == edges_found)
    if cKDTree is not None:
        rows.append({**base, "method": f"scipy cKDTree workers=-1 ({os.cpu_count()} cpus)",
                     "seconds": seconds, "edges": found, "timed_fraction": 1.0,
                     "agree_with_sphere": agree})  # fmt: skip
    for row in rows:
        row["speedup_of_sphere"] = round(row["seconds"] / rows[0]["seconds"], 1)
        row["seconds"] = round(row["seconds"], 6)
    return rows


def graph_rows(name, device, profile=None, report=None):
    """Whole build of a graph spec (node sets, search, CSC sort, attributes) on the device path
    and on the scipy path; a small graph built first warms up CUDA. With ``profile`` (a path),
    the device-path build runs under cProfile and the table of its top functions (cumulative
    time) is written there: where the host time goes. ``report`` is called with each row as it
    is measured."""
    spec = to_plain(OmegaConf.load(ROOT / "conf" / "graph" / f"{name}.yaml"))
    rows = []
    for mode in ("cuda" if device.type == "cuda" else "cpu", "scipy"):
        os.environ["SQUALL_GRAPH_SEARCH"] = mode
        build_graph(to_plain(OmegaConf.load(ROOT / "conf" / "graph" / "o32_l4.yaml")))
        _sync(device)
        start = time.perf_counter()
        graph = build_graph(spec)
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append({"case": "graph", "src": name, "dst": "", "num_src": len(graph.nodes["data"]),
                     "num_dst": len(graph.nodes["hidden"]), "method": f"build_graph ({mode})",
                     "seconds": round(seconds, 3), "timed_fraction": 1.0,
                     "edges": sum(e.num_edges for e in graph.edges.values())})  # fmt: skip
        if report is not None:
            report(rows[-1:])
        del graph
        if profile and mode != "scipy":
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            build_graph(spec)
            _sync(device)
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(25)
            Path(profile).write_text(text.getvalue())
    os.environ.pop("SQUALL_GRAPH_SEARCH", None)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="O1280")
    parser.add_argument("--knn-level", type=int, default=6)
    parser.add_argument("--cutoff-level", type=int, default=8)
    parser.add_argument("--factor", type=float, default=0.6)
    parser.add_argument("--graph", default="o1280_l8", help="graph spec to build, or 'none'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--brute-queries", type=int, default=0, help="0: all")
    parser.add_argument("--csv", default=None, help="results file (default results/knn.csv)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--cases", nargs="+", default=["knn", "cutoff"],
                        choices=("knn", "cutoff"), help="search cases to time")  # fmt: skip
    parser.add_argument("--kernel-blocks", type=int, nargs="*", default=[],
                        help="also time the search kernels with these queries per program")  # fmt: skip
    parser.add_argument("--profile-search", default=None,
                        help="write torch-profiler tables of one search to PREFIX.<case>.txt")  # fmt: skip
    parser.add_argument("--profile-graph", default=None,
                        help="write a cProfile table of the device-path graph build here")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = {**machine_info(), "torch_threads": torch.get_num_threads()}
    grid = grids.grid_from_name(args.grid, "data")
    rows = []

    def finish(new_rows):
        """Print ``new_rows``; with ``--csv`` rewrite that file with every row so far (a run
        cut short by a time limit keeps the rows it measured)."""
        load = os.getloadavg()[0]
        for row in new_rows:
            row.update({"host_load": round(load, 1), "repeats": args.repeats})
            print(f"{row['case']:<7} {row['src']:>9} -> {row['dst']:<7} {row['method']:<42} "
                  f"{row['seconds']:>9.4f} s  x{row.get('speedup_of_sphere', '')}  "
                  f"edges {row['edges']}", flush=True)  # fmt: skip
        rows.extend({**info, **row} for row in new_rows)
        if args.csv is not None:  # a fresh file (the device's output), merged into knn.csv later
            with open(args.csv, "w", newline="") as fh:
                fields = list(dict.fromkeys(k for r in rows for k in r))
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)

    if "knn" in args.cases:
        mesh = grids.icosahedral_mesh(args.knn_level, f"l{args.knn_level}")
        finish(run_case("knn", mesh, grid, device, args, k=3))
    if "cutoff" in args.cases:
        mesh = grids.icosahedral_mesh(args.cutoff_level, f"l{args.cutoff_level}")
        r = args.factor * float(edges.nearest_neighbour_spacing(mesh).max())
        finish(run_case("cutoff", grid, mesh, device, args, r=r))
    if args.graph != "none":
        graph_rows(args.graph, device, args.profile_graph, finish)
    if args.csv is None:
        append_rows("knn.csv", rows)


if __name__ == "__main__":
    main()
