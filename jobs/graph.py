"""Build (or load from cache) a graph and print its statistics.

    python -m jobs.graph                      # the default graph (conf/config.yaml)
    python -m jobs.graph graph=o96_l6         # any spec in conf/graph/
    python -m jobs.graph graph=o96_l6 graph.rebuild=true

Prints a table and one JSON line: nodes per set, edges per edge set, in-degree min/mean/max,
sources left unreached, build time and whether the cache was hit; then the encoder's in-degree
distribution (percentiles, the cap and how many mesh nodes reach it, a histogram) and the number
of boundary points when the data nodes have a boundary band.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from jobs._entry import hydra_job
from squall.graphs import load_or_build
from squall.graphs.store import cache_path, to_plain


def format_table(stats: dict) -> str:
    lines = [f"graph {stats['graph']} (spec {stats['spec_hash']})", ""]
    lines.append(f"{'node set':<16}{'nodes':>12}")
    lines += [f"{name:<16}{n:>12,}" for name, n in stats["nodes"].items()]
    lines.append("")
    header = f"{'edge set':<12}{'src->dst':<18}{'edges':>12}{'deg min':>9}{'deg mean':>10}"
    lines.append(header + f"{'deg max':>9}{'unreached src':>15}")
    for name, e in stats["edges"].items():
        d = e["in_degree"]
        lines.append(
            f"{name:<12}{e['src'] + '->' + e['dst']:<18}{e['edges']:>12,}{d['min']:>9}"
            f"{d['mean']:>10.2f}{d['max']:>9}{e['unreached_src']:>15,}"
        )
    lines += ["", f"build {stats['build_s']:.2f} s, {stats['source']} in {stats['wall_s']:.2f} s"]
    return "\n".join(lines)


@hydra_job()
def main(cfg: DictConfig) -> None:
    spec = to_plain(cfg.graph)
    path = cache_path(spec, cfg.paths.cache + "/graphs")
    hit = path.exists() and not spec.get("rebuild", False)
    start = time.perf_counter()
    graph = load_or_build(spec, cfg.paths.cache + "/graphs")
    stats = graph.statistics()
    stats.update(source="loaded from cache" if hit else "built", cache_file=str(path),
                 wall_s=round(time.perf_counter() - start, 3))  # fmt: skip
    print(format_table(stats))
    print(graph.in_degree_report())
    if "boundary" in stats:
        print(f"boundary: {stats['boundary']['data']:,} of {stats['nodes']['data']:,} data points "
              "forced by the driver (data.boundary)")  # fmt: skip
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
