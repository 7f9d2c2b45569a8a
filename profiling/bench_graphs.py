"""Graph build times on this machine: build each spec from scratch (no cache) and time it.

    python profiling/bench_graphs.py [o96_l6 o320_l7 o1280_l8 ...]

The search path is the default one (the GPU when there is one, else scipy KD-trees);
``SQUALL_GRAPH_SEARCH=scipy|cpu|cuda`` picks another (column ``search``). Prints a table and appends rows to profiling/results/graph_build.csv.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

from squall.graphs import build_graph, load_graph, save_graph  # noqa: E402
from squall.graphs.search import search_device  # noqa: E402
from squall.graphs.store import to_plain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(names):
    rows = []
    for name in names:
        spec = to_plain(OmegaConf.load(ROOT / "conf" / "graph" / f"{name}.yaml"))
        start = time.perf_counter()
        graph = build_graph(spec)
        seconds = time.perf_counter() - start
        stats = graph.statistics()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = save_graph(graph, Path(tmp) / "g.npz")
            t1 = time.perf_counter()
            load_graph(path)
            load_s, save_s, size = time.perf_counter() - t1, t1 - t0, path.stat().st_size
        row = {
            **machine_info(),
            "graph": name,
            "search": str(search_device() or "scipy"),
            "data_nodes": stats["nodes"]["data"],
            "hidden_nodes": stats["nodes"]["hidden"],
            **{f"{k}_edges": v["edges"] for k, v in stats["edges"].items()},
            "build_s": round(seconds, 2),
            "save_s": round(save_s, 2),
            "load_s": round(load_s, 2),
            "file_MB": round(size / 1e6, 1),
        }
        rows.append(row)
        print(f"{name:<12} data {row['data_nodes']:>10,} hidden {row['hidden_nodes']:>9,} "
              f"edges {sum(v['edges'] for v in stats['edges'].values()):>11,} "
              f"build {seconds:7.1f} s  save {save_s:5.1f} s  load {load_s:5.1f} s  {size / 1e6:7.0f} MB", flush=True)  # fmt: skip
        del graph
    append_rows("graph_build.csv", rows)


if __name__ == "__main__":
    main(sys.argv[1:] or ["o96_l6", "o320_l7", "o1280_l8"])
