"""Observation graphs built in the training step: graph build time and the step's overhead.

    python profiling/bench_obs.py                          # one H200: 1 M obs -> level 7; o96 step
    python profiling/bench_obs.py --obs 20000 --mesh-level 5 --step-graph o32_l4 --channels 32 \\
        --layers 2 --heads 4 --vars 14 --step-obs 2000 --steps 3 --backend torch   # CPU check

Cases:

* ``graph``: :func:`squall.graphs.dynamic.observation_edges` of ``--batch`` samples of ``--obs``
  uniformly placed observations each into a level-``--mesh-level`` icosahedral mesh (radius 0.6 x
  the mesh's largest nearest-neighbour spacing, at most 64 per mesh node, as ``model=obs_*``):
  per-sample index build, radius search, CSC pointers, attributes and the attention kernels'
  edge index, all on the device, from observations already there. Median of ``--repeats`` after
  3 warm-ups; also the index build and radius search alone, and on CUDA the whole build and the
  radius search again on the torch path (``SQUALL_SEARCH_KERNEL=0``: the search before its
  Triton kernels), after checking both give the same edges.
* ``step``: one training step (bf16 autocast forward, MSE, backward, fused AdamW) of the
  ``--step-graph`` model with an observation encoder over ``--step-obs`` observations per
  sample, three ways: ``static`` (no observations: the model of the static graphs alone),
  ``obs_prebuilt`` (the observation graph built once, outside the timed steps: the same step on a
  static observation graph) and ``obs_dynamic`` (the graph built inside every step, as training
  does). Median of ``--steps`` after 3 warm-ups, each variant timed in turn ``--rounds`` times.

Each row carries machine, versions, git sha and config; ``--csv`` names the output (default
appended to profiling/results/obs.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402
from _step import add_model_args, load_graph  # noqa: E402

from squall.data.observations import ObsBatch, random_places  # noqa: E402
from squall.graphs import grids  # noqa: E402
from squall.graphs.dynamic import mesh_frames, observation_edges  # noqa: E402
from squall.graphs.edges import nearest_neighbour_spacing  # noqa: E402
from squall.graphs.search import SphereIndex, radius, use_kernel  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.models.obs_encoder import ObservationEncoder  # noqa: E402
from squall.parallel.parallelize import (  # noqa: E402
    ParallelConfig,
    parallelize,
    single_process_groups,
)

#: Observed channels of the step's observations (conf/data/obs_synthetic.yaml observes 6).
OBS_CHANNELS = 6
#: Radius factor and cap of conf/model/obs_*.yaml.
CUTOFF_FACTOR, MAX_NEIGHBOURS = 0.6, 64


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` calls (device synced around each)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def random_obs(n_per_sample: int, batch: int, device, seed: int = 0) -> ObsBatch:
    """``batch`` samples of ``n_per_sample`` uniform observations, random values, 20 % missing."""
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(batch):
        latlon = torch.from_numpy(random_places(rng, n_per_sample))
        values = torch.from_numpy(rng.standard_normal((n_per_sample, OBS_CHANNELS)).astype("f4"))
        mask = torch.from_numpy(rng.random((n_per_sample, OBS_CHANNELS)) >= 0.2)
        parts.append((latlon, values, mask))
    return ObsBatch.pack(parts).to(device)


class torch_path(contextlib.ContextDecorator):
    """Run the sphere search on its torch path (``SQUALL_SEARCH_KERNEL=0``) inside; as a
    decorator of a function, each call of it."""

    def __enter__(self):
        self.old = os.environ.get("SQUALL_SEARCH_KERNEL")
        os.environ["SQUALL_SEARCH_KERNEL"] = "0"
        return self

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("SQUALL_SEARCH_KERNEL", None)
        else:
            os.environ["SQUALL_SEARCH_KERNEL"] = self.old
        return False


def bench_graph(args, device) -> list[dict]:
    mesh = grids.icosahedral_mesh(args.mesh_level, "hidden")
    chord = CUTOFF_FACTOR * float(nearest_neighbour_spacing(mesh).max())
    mesh_latlon = torch.from_numpy(mesh.latlon).to(device)
    frame = mesh_frames(torch.from_numpy(mesh.xyz).to(device))
    obs = random_obs(args.obs, args.batch, device)
    host = obs.offsets.tolist()
    result = {}

    def build():
        result["g"] = observation_edges(obs.latlon, obs.offsets, mesh_latlon, frame, chord,
                                        MAX_NEIGHBOURS, offsets_host=host)  # fmt: skip

    one = obs.latlon[: args.obs]
    parts = {
        "graph": build,
        "index": lambda: SphereIndex.build(one, device, rows=False),
    }
    index = SphereIndex.build(one, device, rows=False)
    parts["radius"] = lambda: radius(index, mesh_latlon, chord, MAX_NEIGHBOURS,
                                     query_xyz=frame[:, 0])  # fmt: skip
    if device.type == "cuda" and use_kernel(index):
        # the Triton kernels against the torch path (SQUALL_SEARCH_KERNEL=0) on this sample:
        # the same edges first, then both timed
        got = parts["radius"]()
        with torch_path():
            want = parts["radius"]()
        equal = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        print(f"radius kernels equal to the torch path: {equal} ({len(got[0])} edges)", flush=True)
        result["equal"] = equal
        parts["graph_torch_path"] = torch_path()(build)
        parts["radius_torch_path"] = torch_path()(parts["radius"])
    if args.profile:
        profile_graph(build, device, args.profile)
    rows = []
    for name, fn in parts.items():
        times = timed(fn, device, args.repeats)
        per = args.batch if name == "graph" else 1
        med = statistics.median(times) / per
        row = {"case": f"graph_{name}", "obs_per_sample": args.obs, "batch": per,
               "mesh_level": args.mesh_level, "mesh_nodes": len(mesh),
               "ms_per_sample": round(1e3 * med, 3),
               "ms_p10": round(1e3 * float(np.percentile(times, 10)) / per, 3),
               "ms_p90": round(1e3 * float(np.percentile(times, 90)) / per, 3)}  # fmt: skip
        if "equal" in result and "torch_path" not in name:
            row["kernel_equal_to_torch_path"] = result["equal"]
        if name == "graph":
            g = result["g"]
            row["edges"] = g.num_edges
            deg = g.index.colptr.diff()
            row["mesh_nodes_without_obs"] = int((deg == 0).sum()) // args.batch
            row["target_ms"] = 5.0
        rows.append(row)
    return rows


def check_device(args, device) -> list[dict]:
    """The device's edges equal the CPU's (``--check-obs`` observations, level-5 mesh, 2 samples
    and an empty one): same sources, destinations and attributes to float32 rounding."""
    mesh = grids.icosahedral_mesh(5, "hidden")
    chord = CUTOFF_FACTOR * float(nearest_neighbour_spacing(mesh).max())
    obs = random_obs(args.check_obs, 2, "cpu", seed=2)
    obs = ObsBatch.pack([obs.sample(0), tuple(t[:0] for t in obs.sample(0)), obs.sample(1)])
    out = {}
    for dev in (torch.device("cpu"), device):
        latlon = torch.from_numpy(mesh.latlon).to(dev)
        frame = mesh_frames(torch.from_numpy(mesh.xyz).to(dev))
        g = observation_edges(obs.latlon.to(dev), obs.offsets, latlon, frame, chord,
                              MAX_NEIGHBOURS)  # fmt: skip
        out[dev.type] = g
    a, b = out["cpu"], out[device.type]
    same = (torch.equal(a.index.colptr, b.index.colptr.cpu())
            and torch.equal(a.index.row, b.index.row.cpu()))  # fmt: skip
    attr_err = float((a.attrs - b.attrs.cpu()).abs().max()) if a.num_edges else 0.0
    return [{"case": "check_cpu_vs_device", "device": device.type, "edges": a.num_edges,
             "edges_equal": same, "attrs_max_abs_diff": attr_err}]  # fmt: skip


def profile_graph(build, device, path: Path, calls: int = 5) -> None:
    """Write the torch profiler's table of ``calls`` graph builds (after 3 warm-ups) to ``path``:
    where the build's time goes, by operator, with the host syncs it makes."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        build()
    _sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            build()
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{calls} builds\n" + table)
    print(f"profile of {calls} builds written to {path}")


def bench_step(args, device) -> list[dict]:
    graph = load_graph(args.step_graph)
    cfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                      processor_layers=args.layers, mlp_ratio=4,
                      trainable_edge_features=args.edge_features,
                      attention_backend=args.backend, compile=args.compile)  # fmt: skip
    torch.manual_seed(0)
    v = args.vars
    model = GraphForecaster(graph, cfg, v, v, 2, [(i, i) for i in range(v)])
    model.obs_encoder = ObservationEncoder(graph.nodes["hidden"], OBS_CHANNELS, cfg.num_channels,
                                           cfg.num_heads, 4, args.backend)  # fmt: skip
    model = model.to(device)
    parallelize(model, graph, ParallelConfig(), single_process_groups())
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    b = args.step_batch
    x = torch.randn(b, 2, model.graph.num_data, v, device=device)
    y = torch.randn(b, model.graph.num_data, v, device=device)
    bf16 = device.type == "cuda"
    enc = model.obs_encoder
    dynamic_build = enc.build_graph
    rows = []
    for n_obs in args.step_obs:
        obs = random_obs(n_obs, b, device, seed=1)
        prebuilt = dynamic_build(obs)

        def step(with_obs: bool, obs=obs):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x, obs=obs) if with_obs else model(x)
                loss = (out.float() - y).square().mean()
            loss.backward()
            opt.step()

        def static():
            step(False)

        def obs_prebuilt(prebuilt=prebuilt):
            enc.build_graph = lambda o, ids=None: prebuilt
            try:
                step(True)
            finally:
                enc.build_graph = dynamic_build

        def obs_dynamic():
            step(True)

        variants = {"static": static, "obs_prebuilt": obs_prebuilt, "obs_dynamic": obs_dynamic}
        times = {k: [] for k in variants}
        for _ in range(args.rounds):  # interleaved, so drifts hit every variant alike
            for name, fn in variants.items():
                times[name] += timed(fn, device, args.steps)
        med = {k: statistics.median(t) for k, t in times.items()}
        for name in variants:
            rows.append({
                "case": f"step_{name}", "graph": args.step_graph, "obs_per_sample": n_obs,
                "batch": b, "channels": args.channels, "layers": args.layers,
                "backend": args.backend, "compile": args.compile, "obs_edges": prebuilt.num_edges,
                "ms_per_step": round(1e3 * med[name], 2),
                "ms_p10": round(1e3 * float(np.percentile(times[name], 10)), 2),
                "ms_p90": round(1e3 * float(np.percentile(times[name], 90)), 2),
                "vs_static": round(med[name] / med["static"], 4),
                "vs_obs_prebuilt": round(med[name] / med["obs_prebuilt"], 4),
                "target_vs_obs_prebuilt": 1.10,
            })  # fmt: skip
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--obs", type=int, default=1_000_000, help="observations per sample (graph)")
    p.add_argument("--batch", type=int, default=1, help="samples per graph build")
    p.add_argument("--mesh-level", type=int, default=7)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--check-obs",
        type=int,
        default=100_000,
        help="observations per sample of the CPU-vs-device check (0: skip)",
    )
    p.add_argument("--profile", type=Path, default=None,
                   help="write a torch-profiler table of the graph build here")  # fmt: skip
    p.add_argument("--step-graph", default="o96_l6", help="graph of the step ('none': skip)")
    p.add_argument("--step-obs", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--step-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--backend", default="triton", choices=("torch", "triton"))
    p.add_argument("--csv", type=Path, default=None, help="write rows here (default: append "
                   "to profiling/results/obs.csv)")  # fmt: skip
    add_model_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info()
    rows = check_device(args, device) if args.check_obs else []
    rows += bench_graph(args, device)
    for row in rows:
        print(row, flush=True)
    if args.step_graph != "none":
        step_rows = bench_step(args, device)
        for row in step_rows:
            print(row, flush=True)
        rows += step_rows
    rows = [{**info, **row} for row in rows]
    if args.csv is None:
        print("appended to", append_rows("obs.csv", rows))
    else:
        import csv

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        print("wrote", args.csv)


if __name__ == "__main__":
    main()
