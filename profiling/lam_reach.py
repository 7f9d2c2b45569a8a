"""How far can information travel in one step of a limited-area model? Counted on its graph.

    PYTHONPATH=src .venv/bin/python profiling/lam_reach.py [--levels 6 8] [--layers 2 4 8]
        [--name lam_reach]

Builds ``conf/graph/lam_alps.yaml`` with each hidden mesh ``--levels`` (the encoder capped at 256
neighbours, as the level-6 runs of ``lam_curves.py`` use it) and reports

* the edge lengths of the encoder (its radius), the decoder and the multi-scale processor, the
  processor's by refinement level: which levels' nodes and edges exist inside the cut-out box
  (a level's edge is kept when both its ends are inside);
* the hop reach of one model step with ``L`` processor layers: grid point ``q`` can influence
  grid point ``p`` when a path encoder -> ``L`` processor hops (each layer also keeps its own
  node: the residual) -> decoder joins them. For the interior points with at least ``--flow``
  degrees of longitude of the box upstream (west) of them, between 44.5 and 47.5 N, the largest
  upstream distance along their row (``|dlat| < 0.5``) from which anything reaches them, and the
  share that reach the point ``--flow`` degrees west: what moving the air one step needs.

The count is an upper bound on the trained network's reach (attention may weigh a path to ~0);
``lam_sensitivity.py`` measures what a trained model does. Rows to results/<name>.csv, table
<name>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, git_sha, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The synthetic flow moves 4.8 degrees of longitude per 6 h step on lam_alps (lam_oracle.py).
FLOW_DEG_LON = 4.8


def adjacency(edges) -> np.ndarray:
    """``[num_dst, num_src]`` 0/1 float32 of a CSC edge set."""
    a = np.zeros((edges.num_dst, edges.num_src), np.float32)
    a[np.repeat(np.arange(edges.num_dst), np.diff(edges.colptr)), edges.row] = 1.0
    return a


def lengths_deg(graph, edges) -> np.ndarray:
    """Great-circle length of every edge, degrees."""
    src, dst = graph.nodes[edges.src].xyz, graph.nodes[edges.dst].xyz
    d = np.repeat(np.arange(edges.num_dst), np.diff(edges.colptr))
    return np.degrees(np.arccos(np.clip((src[edges.row] * dst[d]).sum(1), -1.0, 1.0)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--levels", type=int, nargs="+", default=[6, 8])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--flow", type=float, default=FLOW_DEG_LON, help="deg lon per step")
    p.add_argument("--name", default="lam_reach")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from squall.graphs.graph import build_graph

    rows, md = [], []
    for level in args.levels:
        spec = yaml.safe_load(open(ROOT / "conf" / "graph" / "lam_alps.yaml"))
        spec["nodes"]["hidden"]["level"] = level
        spec["edges"]["encoder"]["max_neighbours"] = 256
        g = build_graph(spec)
        hidden = g.nodes["hidden"]
        # a node's coarsest level (the level it first appears at)
        node_level = np.asarray(hidden.mesh_levels)
        proc = g.edges["processor"]
        plen = lengths_deg(g, proc)
        pd = np.repeat(np.arange(proc.num_dst), np.diff(proc.colptr))
        edge_level = np.maximum(node_level[proc.row], node_level[pd])
        md.append(f"### mesh level {level}: {len(hidden)} mesh nodes in the box\n")
        md.append("| edges | count | length min deg | median | max |")
        md.append("|---|---|---|---|---|")
        for name in ("encoder", "decoder"):
            ln = lengths_deg(g, g.edges[name])
            md.append(f"| {name} | {len(ln)} | {ln.min():.2f} | {np.median(ln):.2f} | "
                      f"{ln.max():.2f} |")  # fmt: skip
            rows.append({"level": level, "what": f"{name} edges", "count": len(ln),
                         "max_deg": round(float(ln.max()), 3)})  # fmt: skip
        for lv in range(int(node_level.max()) + 1):
            m = edge_level == lv
            nodes_lv = int((node_level <= lv).sum())
            if not m.any():
                md.append(f"| processor, level {lv} ({nodes_lv} nodes) | 0 | | | |")
                continue
            ln = plen[m]
            md.append(f"| processor, level {lv} ({nodes_lv} nodes) | {int(m.sum())} | "
                      f"{ln.min():.2f} | {np.median(ln):.2f} | {ln.max():.2f} |")  # fmt: skip
            rows.append({"level": level, "what": f"processor level {lv} edges",
                         "count": int(m.sum()), "max_deg": round(float(ln.max()), 3)})  # fmt: skip
        enc, dec = adjacency(g.edges["encoder"]), adjacency(g.edges["decoder"])
        step = np.minimum(adjacency(proc) + np.eye(len(hidden), dtype=np.float32), 1.0)
        ll = np.degrees(g.nodes["data"].latlon)
        lat, lon = ll[:, 0], ll[:, 1]
        lon0 = float(spec["nodes"]["data"]["region"][2])
        dst = np.flatnonzero((lon >= lon0 + args.flow + 0.5) & (lat > 44.5) & (lat < 47.5))
        md.append("")
        md.append(f"Hop reach of one step at level {level} ({len(dst)} interior points with "
                  f"{args.flow + 0.5:g} deg lon of box upstream, 44.5-47.5 N):\n")  # fmt: skip
        md.append(f"| processor layers | upstream reach min deg lon | median | max | "
                  f"reach {args.flow:g} deg upstream |")  # fmt: skip
        md.append("|---|---|---|---|---|")
        h = enc  # [hidden, data]: which grid points reach each mesh node
        done = 0
        for layers in sorted(args.layers):
            for _ in range(layers - done):
                h = np.minimum(step @ h, 1.0)
            done = layers
            reach = (dec[dst] @ h) > 0  # [dst, data]
            up = np.empty(len(dst))
            hit = np.empty(len(dst), bool)
            for i, d in enumerate(dst):
                row = reach[i] & (np.abs(lat - lat[d]) < 0.5)
                up[i] = (lon[d] - lon[row]).max()
                hit[i] = (row & (np.abs(lon[d] - args.flow - lon) < 0.1)).any()
            md.append(f"| {layers} | {up.min():.2f} | {np.median(up):.2f} | {up.max():.2f} | "
                      f"{hit.mean():.0%} |")  # fmt: skip
            rows.append({"level": level, "what": f"reach {layers} layers", "count": len(dst),
                         "median_deg_lon": round(float(np.median(up)), 3),
                         "share_reaching_flow": round(float(hit.mean()), 4)})  # fmt: skip
        md.append("")
    write_rows(args.results / f"{args.name}.csv", rows)
    head = [
        "# lam_alps: how far one model step can move information\n",
        f"Generated by `profiling/lam_reach.py` (git {git_sha()}): counted on the graph, no "
        "training. Command: `PYTHONPATH=src .venv/bin/python profiling/lam_reach.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`. The synthetic flow moves 4.8 deg lon per 6 h step.\n",
    ]
    (args.results / f"{args.name}.md").write_text("\n".join(head + md) + "\n")
    print("\n".join(head + md))


if __name__ == "__main__":
    main()
