"""Host (launch) time against device time of a training step, per phase, on ``P`` ranks.

    torchrun --standalone --nproc-per-node P profiling/profile_launch.py --graph o96_l6 --out DIR

The step is ``profiling/bench_parallel.py time``'s (1024 channels, 16 heads, 16 layers, triton,
bf16 autocast, every block recomputed, eager, no overlap, fused AdamW; model-parallel over the
``P`` ranks). For ``--graph`` and, with the same model, ``--host-graph`` (a graph so small that
the device finishes every kernel as soon as it is launched: the step then takes its host time)
it measures:

* the step and its phases (forward, loss, backward, optimizer): CUDA events, median;
* the same step with every halo exchange replaced by zeros and no gradient reduction (``solo``);
* one step under ``torch.profiler``: kernel launches per phase (runtime and driver launch calls,
  async copies and memsets), host calls that wait for the device, device busy time (kernels of
  the compute streams, NCCL apart), and the device's idle time split into **host gaps** (the
  next kernel was launched only after the device had run dry: the host was late) and **other
  gaps** (the kernel was queued in time: waiting on another stream, i.e. the peer's halo);
* with ``--count 1``, one step's activation tensors counted (:mod:`squall.planning.memory`)
  and the allocator's static bytes (parameters and AdamW state before the step).

Writes ``DIR/launch_<P>.json`` (rank 0: every rank's numbers) and prints one line per graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import machine_info  # noqa: E402

from squall.distributed.env import destroy_distributed, dist_env, init_distributed  # noqa: E402
from squall.distributed.layout import Layout, build_groups  # noqa: E402
from squall.graphs import build_graph, load_or_build  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.parallel.parallelize import ParallelConfig, parallelize  # noqa: E402
from squall.train.loop import area_weighted_mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
NUM_VARS = 100  # as bench_parallel / bench_step
PHASES = ("forward", "loss", "backward", "optimizer")
# O16 grid (1,248 points) and a level-3 mesh (642 nodes): at 1024 channels every kernel of the
# step runs in a few microseconds, below the host's time per launch.
HOST_GRAPH = {
    "name": "o16_l3",
    "nodes": {"data": {"type": "grid", "grid": "O16"}, "hidden": {"type": "icosahedral", "level": 3}},
    "edges": {"encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
              "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
              "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3}},
}  # fmt: skip
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchCooperativeKernel")  # fmt: skip
WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cuStreamSynchronize", "cuCtxSynchronize")  # fmt: skip


class _NoExchange:
    """A halo exchange that moves nothing: zeros of the halo's shape, at once."""

    def __init__(self, exchange):
        self.num_recv = exchange.num_recv

    def _zeros(self, x):
        return x.new_zeros((x.shape[0], self.num_recv, x.shape[2]))

    def start(self, x):
        zeros = self._zeros(x)
        return type("Done", (), {"wait": staticmethod(lambda: zeros)})()

    def __call__(self, x):
        return self._zeros(x)


def _graph(name: str, cache: str):
    import yaml

    if name == HOST_GRAPH["name"]:
        return build_graph(HOST_GRAPH)
    spec = yaml.safe_load((REPO / "conf" / "graph" / f"{name}.yaml").read_text())
    return load_or_build(spec, cache)


def _intervals_union(iv: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for a, b in sorted(iv):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def parse_trace(path: str) -> dict:
    """Per-phase launches, device busy and idle (host gaps / other gaps) of one profiled step
    (a chrome trace of ``torch.profiler`` with ``squall::<phase>`` annotations). Times in s."""
    ev = json.loads(Path(path).read_text())["traceEvents"]
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"].split("::", 1)[1])
                    for e in ev if e.get("cat") == "user_annotation"
                    and str(e.get("name", "")).startswith("squall::"))  # fmt: skip

    def phase_of(ts):
        for a, b, name in phases:
            if a <= ts <= b:
                return name
        return "other"

    launch = {}  # correlation -> (host ts, phase)
    counts = {p: 0 for p in (*PHASES, "other")}
    waits = {p: 0 for p in (*PHASES, "other")}
    for e in ev:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        name = e.get("name", "")
        ph = phase_of(e["ts"])
        if name in LAUNCH_CALLS or "LaunchKernel" in name:
            counts[ph] += 1
            launch[e.get("args", {}).get("correlation")] = (e["ts"], ph)
        elif name in WAIT_CALLS:
            waits[ph] += 1
    kernels = []
    for e in ev:
        if e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        corr = e.get("args", {}).get("correlation")
        host_ts, ph = launch.get(corr, (None, "other"))
        kernels.append((e["ts"], e["ts"] + e["dur"], host_ts, ph,
                        str(e.get("name", "")).startswith("nccl")))  # fmt: skip
    compute = sorted(k for k in kernels if not k[4])
    busy = {p: 0.0 for p in counts}
    nccl = {p: 0.0 for p in counts}
    host_gap = {p: 0.0 for p in counts}
    other_gap = {p: 0.0 for p in counts}
    for a, b, _h, ph, is_nccl in kernels:
        (nccl if is_nccl else busy)[ph] += (b - a) / 1e6
    end = None
    for a, b, h, ph, _ in compute:
        if end is not None and a > end:
            gap = (a - end) / 1e6
            # launched after the device had run dry (a few us of launch latency allowed): the
            # host was late; else the kernel waited in its queue (another stream, the peer)
            if h is not None and h + 5 >= end:
                host_gap[ph] += gap
            else:
                other_gap[ph] += gap
        end = b if end is None else max(end, b)
    span = {}
    for p in counts:
        ks = [k for k in compute if k[3] == p]
        span[p] = (max(k[1] for k in ks) - min(k[0] for k in ks)) / 1e6 if ks else 0.0
    host = {name: (b - a) / 1e6 for a, b, name in phases}
    return {"launches": counts, "waits": waits, "device_busy_s": busy, "nccl_s": nccl,
            "host_gap_s": host_gap, "other_gap_s": other_gap, "device_span_s": span,
            "host_phase_s": host,
            "busy_union_s": _intervals_union([(k[0], k[1]) for k in compute]) / 1e6,
            "kernels": len(kernels)}  # fmt: skip


def profiled(step, sync, cuda: bool) -> dict:
    """One annotated step under ``torch.profiler``, parsed (:func:`parse_trace`)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/trace.json"
        sync()
        dist.barrier()
        with torch.profiler.profile(activities=acts) as prof:
            step(annotate=True)
            sync()
        prof.export_chrome_trace(path)
        return parse_trace(path)


def measure(graph_name: str, args, env, device, groups) -> dict:
    cuda = device.type == "cuda"
    if env.rank == 0:
        g = _graph(graph_name, args.cache)
    dist.barrier()
    if env.rank != 0:
        g = _graph(graph_name, args.cache)
    torch.manual_seed(0)
    mcfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                       processor_layers=args.layers, mlp_ratio=4, trainable_edge_features=8,
                       attention_backend=args.backend, checkpoint_encoder=True,
                       checkpoint_processor=True, checkpoint_decoder=True)  # fmt: skip
    model = GraphForecaster(g, mcfg, NUM_VARS, NUM_VARS, 2,
                            residual_map=[(i, i) for i in range(NUM_VARS)]).to(device)  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.01)
    pcfg = ParallelConfig(env.world_size, "sfc", overlap=False, chunks=1,
                          param_dtype="bf16" if cuda else "fp32")  # fmt: skip
    model = parallelize(model, g, pcfg, groups)
    model.runner.overlap = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    n = model.graph.num_data
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 2, n, NUM_VARS, device=device, generator=gen)
    y = torch.randn(1, n, NUM_VARS, device=device, generator=gen)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(events=None, hosts=None, annotate=False):
        def mark():
            if events is not None:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append(ev)
            if hosts is not None:
                hosts.append(time.perf_counter())

        def scope(name):
            return torch.profiler.record_function(f"squall::{name}") if annotate else _Null()

        opt.zero_grad(set_to_none=True)
        mark()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            with scope("forward"):
                out = model(x)
            mark()
            with scope("loss"):
                loss = area_weighted_mse(out, y, model.graph.area)
        mark()
        with scope("backward"):
            loss.backward()
        mark()
        with scope("optimizer"):
            opt.step()
        mark()

    def timed(steps):
        rows = []
        for _ in range(steps):
            events, hosts = [], []
            sync()
            dist.barrier()
            step(events if cuda else None, hosts)
            sync()
            if cuda:
                t = [events[0].elapsed_time(e) / 1e3 for e in events[1:]]
            else:  # CPU (a check of this script): host clocks
                t = [h - hosts[0] for h in hosts[1:]]
            rows.append({"step_s": t[-1], **{p: t[i] - (t[i - 1] if i else 0.0)
                                             for i, p in enumerate(PHASES)},
                         **{f"host_{p}": hosts[i + 1] - hosts[i] for i, p in enumerate(PHASES)}})  # fmt: skip
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    static = torch.cuda.memory_allocated(device) / GIB if cuda else float("nan")
    real = timed(args.steps)
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
    trace = {"real": profiled(step, sync, cuda)}
    counted = None
    if args.count and graph_name != HOST_GRAPH["name"]:
        from squall.planning.memory import count_step

        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                return area_weighted_mse(model(x), y, model.graph.area)

        opt.zero_grad(set_to_none=True)
        totals, counter = count_step(forward)
        opt.zero_grad(set_to_none=True)
        counted = {"held_GiB": totals["held_bytes"] / GIB, "peak_GiB": totals["peak_bytes"] / GIB,
                   "top_after_forward": counter.breakdown("forward", 12)}  # fmt: skip
    # last (the model is not restored): the rank alone, exchanges return zeros, no gradient
    # reduction
    solo = None
    local = getattr(model.graph, "local", {})
    if env.world_size > 1:
        reducer = model.runner.grad_reducer
        if reducer is not None:
            reducer.remove()
        for le in local.values():
            if le.exchange is not None:
                le.exchange = _NoExchange(le.exchange)
        step()
        solo = timed(max(3, args.steps // 2))
        trace["solo"] = profiled(step, sync, cuda)
    out = {"rank": env.rank, "graph": graph_name, "real": real, "solo": solo, "trace": trace,
           "static_GiB": static, "peak_GiB": peak, "count": counted,
           "n_local_data": model.graph.num_data, "n_local_mesh": model.graph.num_mesh}  # fmt: skip
    return out


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default="o96_l6")
    ap.add_argument("--host-graph", default=HOST_GRAPH["name"], help="'' to skip")
    ap.add_argument("--cache", default="/tmp/squall-graphs")
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = dist_env()
    init_distributed(env)
    device = torch.device(f"cuda:{env.local_rank}" if env.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = build_groups(Layout(env.world_size, env.world_size))
    results = {}
    for name in [args.graph, *([args.host_graph] if args.host_graph else [])]:
        mine = measure(name, args, env, device, groups)
        torch.cuda.empty_cache()
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
        results[name] = gathered
        if env.rank == 0:
            for r in gathered:
                t, tr = r["real"], r["trace"]["real"]
                print(f"P={env.world_size} {name} rank {r['rank']}: step {t['step_s']:.4f} s "
                      f"(fwd {t['forward']:.4f} bwd {t['backward']:.4f}), launches "
                      f"{sum(tr['launches'].values())} ({tr['launches']['forward']} fwd, "
                      f"{tr['launches']['backward']} bwd), busy {tr['busy_union_s']:.4f} s, "
                      f"host gaps {sum(tr['host_gap_s'].values()):.4f} s, other gaps "
                      f"{sum(tr['other_gap_s'].values()):.4f} s, waits {sum(tr['waits'].values())}"
                      + (f", solo {r['solo']['step_s']:.4f} s" if r["solo"] else ""), flush=True)  # fmt: skip
    if env.rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        info = {"info": machine_info(), "gpus": env.world_size, "channels": args.channels,
                "heads": args.heads, "layers": args.layers, "backend": args.backend,
                "checkpoint": True, "compile": False, "batch": 1, "graphs": results}  # fmt: skip
        Path(args.out, f"launch_{env.world_size}.json").write_text(json.dumps(info))
    destroy_distributed()


if __name__ == "__main__":
    main()
