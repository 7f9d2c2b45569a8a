"""Model-parallel benchmark: partition halo volume (plan only), NCCL correctness, and training-step
timing on 1, 2 and 4 GPUs.

    python profiling/bench_parallel.py partition                   # CPU, plans only
    torchrun --standalone --nproc_per_node=4 profiling/bench_parallel.py check
    torchrun --standalone --nproc_per_node=N profiling/bench_parallel.py time --out DIR
    python profiling/bench_parallel.py table DIR                   # DIR/*.json -> results/
    python profiling/bench_parallel.py shares --out DIR            # each rank's share, one GPU

``time`` runs forward + backward + fused AdamW of the o320_l7 model (1024 channels, 16 heads, 16
processor layers, bf16 autocast, activation checkpointing of every block) on random normalised
inputs, batch 1, with overlap on and off, and measures:

* s/step: median of CUDA-event times of the measured steps (after warm-up);
* peak allocated memory of every rank;
* halo bytes per step: bytes every rank sent in the step (forward and backward exchanges);
* halo time: each edge set's exchange timed alone (forward and reverse directions), times its
  uses per step; the share hidden by overlap is ``(t_off - t_on) / t_halo``;
* with one GPU, the decoder's and encoder's peak activation memory with ``chunks`` 1 and 4;
* ``--shard-parameters 1``: parameters, gradients and AdamW state sharded over the ranks (FSDP2,
  blocks gathered in bf16); every rank's parameter + gradient + optimizer bytes (its local
  shards) are recorded either way (``state_GiB``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, append_rows, machine_info  # noqa: E402

from squall.distributed.env import destroy_distributed, dist_env, init_distributed  # noqa: E402
from squall.distributed.layout import Layout, build_groups  # noqa: E402
from squall.graphs import build_graph, load_or_build  # noqa: E402
from squall.models.forecaster import GraphForecaster, ModelConfig  # noqa: E402
from squall.parallel.halo import build_halo_plans  # noqa: E402
from squall.parallel.parallelize import ParallelConfig, parallelize  # noqa: E402
from squall.parallel.partition import partition_graph, partition_report  # noqa: E402
from squall.parallel.sharding import local_state_bytes  # noqa: E402
from squall.planning.estimate import describe_checkpointing, estimate  # noqa: E402
from squall.train.loop import area_weighted_mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# 100 normalised variables in and out, as profiling/bench_step.py, so the numbers compare.
NUM_VARS = 100


def load_graph_spec(name: str, cache: str | None):
    import yaml

    spec = yaml.safe_load((REPO / "conf" / "graph" / f"{name}.yaml").read_text())
    return load_or_build(spec, cache) if cache else build_graph(spec)


# -- partition: halo volume from the plans alone ------------------------------------------------


def cmd_partition(args) -> None:
    rows = []
    for name in args.graphs:
        g = load_graph_spec(name, args.cache)
        layers = args.layers
        for parts in args.parts:
            reps = {m: partition_report(g, partition_graph(g, parts, m, {"processor": layers}))
                    for m in ("ranges", "bands", "sfc")}  # fmt: skip
            for method, rep in reps.items():
                n_data = len(g.nodes["data"])
                n_mesh = len(g.nodes["hidden"])
                # rows every rank receives per step: encoder + decoder once, processor per layer
                per_step = (rep.halo_rows["encoder"] + rep.halo_rows["decoder"]
                            + layers * rep.halo_rows["processor"])  # fmt: skip
                # an all-gather of a whole source grid delivers N_src - n_own rows to each rank
                gather = {"encoder": parts * n_data - n_data, "decoder": parts * n_mesh - n_mesh}
                rows.append({
                    "graph": name, "parts": parts, "method": method,
                    "halo_encoder": rep.halo_rows["encoder"],
                    "halo_processor": rep.halo_rows["processor"],
                    "halo_decoder": rep.halo_rows["decoder"],
                    "halo_total": rep.halo_rows["total"],
                    "halo_rows_per_step": per_step,
                    "reduction_vs_ranges": round(
                        1 - rep.halo_rows["total"] / reps["ranges"].halo_rows["total"], 4),
                    "reduction_vs_bands": round(
                        1 - rep.halo_rows["total"] / reps["bands"].halo_rows["total"], 4),
                    "encoder_vs_allgather": round(rep.halo_rows["encoder"] / gather["encoder"], 5),
                    "decoder_vs_allgather": round(rep.halo_rows["decoder"] / gather["decoder"], 5),
                    "edge_imbalance": round(rep.edge_imbalance["total"], 4),
                    "processor_edge_imbalance": round(rep.edge_imbalance["processor"], 4),
                    "data_node_imbalance": round(rep.node_imbalance["data"], 4),
                    "max_peers": max(max(len(v) for v in s.peers.values()) for s in rep.parts),
                })  # fmt: skip
                print(rows[-1], flush=True)
    info = machine_info()
    append_rows("parallel_partition.csv", [{**info, **r} for r in rows])
    lines = [
        "# Halo volume of the partitions (profiling/bench_parallel.py partition)",
        "",
        f"{info['date']} UTC, git {info['git']}, plans only (no GPU). Halo rows summed over ranks, "
        f"per exchange of each edge set; per step = encoder + decoder + {args.layers} x processor. "
        "`*_vs_allgather`: mapper halo rows over the rows an all-gather of the whole source grid "
        "would deliver (target <= 1/P). Processor edges weigh the number of layers in the "
        "balance.",
        "",
        "| graph | P | method | encoder | processor | decoder | total | per step | cut vs ranges "
        "| cut vs bands | enc / all-gather | dec / all-gather | edge imbalance "
        "| processor edge imb. | data node imb. | max peers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['graph']} | {r['parts']} | {r['method']} | {r['halo_encoder']:,} "
            f"| {r['halo_processor']:,} | {r['halo_decoder']:,} | {r['halo_total']:,} "
            f"| {r['halo_rows_per_step']:,} | {100 * r['reduction_vs_ranges']:.1f}% "
            f"| {100 * r['reduction_vs_bands']:.1f}% "
            f"| {r['encoder_vs_allgather']:.4f} | {r['decoder_vs_allgather']:.4f} "
            f"| {r['edge_imbalance']:.3f} | {r['processor_edge_imbalance']:.3f} "
            f"| {r['data_node_imbalance']:.3f} | {r['max_peers']} |"
        )
    (RESULTS / "parallel_partition.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- check: NCCL (or gloo) correctness on a tiny graph -------------------------------------------


def _tiny_graph():
    return build_graph({
        "name": "o16_l3",
        "nodes": {"data": {"type": "grid", "grid": "O16"},
                  "hidden": {"type": "icosahedral", "level": 3}},
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    })  # fmt: skip


def _tiny_model(g, device, backend):
    torch.manual_seed(0)
    cfg = ModelConfig(num_channels=48, num_heads=3, processor_layers=2, mlp_ratio=2,
                      trainable_edge_features=2, attention_backend=backend)  # fmt: skip
    m = GraphForecaster(g, cfg, 5, 4, 2, residual_map=[(0, 0), (1, 1)]).to(device)
    torch.nn.init.normal_(m.head.weight, std=0.1)
    return m


def cmd_check(args) -> None:
    env = dist_env()
    init_distributed(env)
    device = torch.device(f"cuda:{env.local_rank}" if env.backend == "nccl" else "cpu")
    g = _tiny_graph()
    results = []
    for mp_degree in sorted({env.world_size, 2} & set(range(2, env.world_size + 1))):
        layout = Layout(env.world_size, mp_degree)
        groups = build_groups(layout)
        part = partition_graph(g, mp_degree, "sfc")
        # exchange: exact rows (values from global ids)
        exact = True
        for e in g.edges.values():
            plan = build_halo_plans(e, part)[groups.model_rank]
            from squall.parallel.comm import HaloExchange

            ex = HaloExchange(plan, groups.model, device)
            val = torch.tensor(plan.owned_src, dtype=torch.float32, device=device)
            x = val[None, :, None].repeat(2, 1, 3) + torch.arange(3, device=device)
            halo = ex.start(x).wait()
            want = torch.tensor(plan.halo_src, dtype=torch.float32, device=device)
            exact &= bool(torch.equal(halo, want[None, :, None].repeat(2, 1, 3)
                                      + torch.arange(3, device=device)))  # fmt: skip
        for backend in args.backends:
            torch.manual_seed(1 + groups.data_rank)
            x = torch.randn(2, 2, len(g.nodes["data"]), 5, device=device)
            y = torch.randn(2, len(g.nodes["data"]), 4, device=device)
            ref = _tiny_model(g, device, backend)
            ref_out = ref(x)
            area_weighted_mse(ref_out, y, ref.graph.area).backward()
            # the reference gradient of the data-parallel mean over the replicas' batches
            if groups.data is not None:  # None: a group of one (None would mean the world)
                for p in ref.parameters():
                    dist.all_reduce(p.grad, group=groups.data)
                    p.grad /= layout.data_parallel
            for overlap in (True, False):
                model = parallelize(_tiny_model(g, device, backend), g,
                                    ParallelConfig(mp_degree, "sfc", overlap,
                                                   grad_bucket_mb=args.bucket_mb), groups)  # fmt: skip
                ids = model.graph.data_ids_t
                out = model(x.index_select(2, ids))
                area_weighted_mse(out, y[:, ids], model.graph.area).backward()
                fwd = (out - ref_out[:, ids]).abs().max().item()
                grad = max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
                           for p, q in zip(model.parameters(), ref.parameters(), strict=True))  # fmt: skip
                results.append({
                    "world": env.world_size, "model_parallel": mp_degree, "rank": env.rank,
                    "backend": backend, "overlap": overlap, "exchange_exact": exact,
                    "forward_bitwise": bool(torch.equal(out, ref_out[:, ids])),
                    "forward_max_abs_diff": fwd, "grad_max_rel_diff": grad,
                })  # fmt: skip
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, results)
    if env.rank == 0:
        rows = [r for rs in gathered for r in rs]
        for r in rows:
            print(r)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "check.json").write_text(json.dumps({"info": machine_info(),
                                                                "rows": rows}))  # fmt: skip
        ok = all(r["exchange_exact"] and r["forward_max_abs_diff"] < 1e-3
                 and r["grad_max_rel_diff"] < 1e-2 for r in rows)  # fmt: skip
        print("CHECK", "PASSED" if ok else "FAILED", flush=True)
    destroy_distributed()


# -- time: o320_l7-class training steps ----------------------------------------------------------


def _events_time(fn, reps: int, sync) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (device events on GPU)."""
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Marks:
    """Phase boundaries of one step: CUDA events (or host clocks on CPU) and, on CUDA, the
    allocated bytes at each mark (host-side counter, no sync)."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.alloc = cuda, [], []

    def __call__(self, i: int) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)
            self.alloc.append(torch.cuda.memory_allocated())
        else:
            self.events.append(time.perf_counter())

    def sync(self) -> None:
        if self.cuda:
            self.events[-1].synchronize()

    def seconds(self) -> list[float]:
        """Seconds from the start to each later mark."""
        if self.cuda:
            return [self.events[0].elapsed_time(e) / 1e3 for e in self.events[1:]]
        return [e - self.events[0] for e in self.events[1:]]


class _Zeros(torch.autograd.Function):
    """Zero halo rows that take part in autograd (so the backward passes a trace mark where the
    reverse exchange would start), with no gradient for the owned rows: nothing moves."""

    @staticmethod
    def forward(ctx, x, num_recv):
        return x.new_zeros((x.shape[0], num_recv, x.shape[2]))

    @staticmethod
    def backward(ctx, _grad):
        return None, None


class _NoExchange:
    """Stand-in for a HaloExchange that moves nothing: zeros of the halo's shape, at once."""

    def __init__(self, exchange):
        self.num_recv = exchange.num_recv

    def start(self, x):
        zeros = _Zeros.apply(x, self.num_recv)
        # source: the owned rows the block computes with (a real exchange returns its view)
        return type("Done", (), {"wait": staticmethod(lambda: zeros), "source": x})()

    def __call__(self, x):
        return _Zeros.apply(x, self.num_recv)


class _Mark(torch.autograd.Function):
    """Identity that records a trace event when it runs forward and when its gradient passes."""

    @staticmethod
    def forward(ctx, x, trace, tag):
        trace.record(f"{tag}:fwd")
        ctx.trace, ctx.tag = trace, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.trace.record(f"{ctx.tag}:bwd")
        return grad, None, None


class _Trace:
    """CUDA events (host clocks on CPU) at every exchange of a step, in order, by tag:
    ``send:fwd`` before an exchange starts, ``recv:fwd`` once its halo is there, ``recv:bwd``
    when the halo's gradient is ready (the reverse exchange starts), ``send:bwd`` once the
    reverse exchange has come back and been added."""

    def __init__(self, cuda: bool):
        self.cuda, self.on, self.marks = cuda, False, []

    def record(self, tag: str) -> None:
        if not self.on:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((tag, ev))
        else:
            self.marks.append((tag, time.perf_counter()))

    def start(self):
        self.marks, self.on = [], True
        self.record("step:start")

    def stop(self) -> list[tuple[str, float]]:
        """``(tag, seconds since the step started)`` of every mark (synchronises)."""
        self.record("step:end")
        self.on = False
        t0 = self.marks[0][1]
        if self.cuda:
            self.marks[-1][1].synchronize()
            return [(tag, t0.elapsed_time(ev) / 1e3) for tag, ev in self.marks]
        return [(tag, t - t0) for tag, t in self.marks]


class _Traced:
    """An exchange (real or :class:`_NoExchange`) with :class:`_Mark` around it (the
    runner's ``exchange(x)`` and ``exchange.start(x).wait()`` both)."""

    def __init__(self, inner, trace: _Trace, role: str):
        self.inner, self.trace, self.role = inner, trace, role

    def start(self, x):
        pending = self.inner.start(_Mark.apply(x, self.trace, f"{self.role}:send"))
        trace, role = self.trace, self.role
        done = type("Traced", (), {"wait": staticmethod(
            lambda: _Mark.apply(pending.wait(), trace, f"{role}:recv")),
            "source": pending.source})  # fmt: skip
        return done()

    def __call__(self, x):
        return self.start(x).wait()


def _exchange_segments(marks: list[tuple[str, float]]) -> dict:
    """Per-exchange waits and compute segments of one traced step of one rank.

    ``fwd_wait`` / ``bwd_wait``: seconds the compute stream spent in each exchange (forward:
    ``send`` to ``recv``; backward: ``recv`` to ``send``, the reverse exchange), in step order;
    ``segments``: the time between consecutive exchanges (compute), from the step start to its
    end. With real exchanges a rank's wait is its transfer plus the time it waits for a later
    peer; without (solo), the waits are ~0 and the segments are the rank's own compute.
    """
    fwd, bwd, segments, last = [], [], [], 0.0
    open_fwd = open_bwd = None
    for tag, t in marks[1:]:
        kind = tag.rsplit(":", 2)
        what = kind[-2:] if len(kind) >= 2 else kind
        if what == ["send", "fwd"]:
            segments.append(t - last)
            open_fwd = t
        elif what == ["recv", "fwd"] and open_fwd is not None:
            fwd.append(t - open_fwd)
            last, open_fwd = t, None
        elif what == ["recv", "bwd"]:
            segments.append(t - last)
            open_bwd, last = t, t
        elif what == ["send", "bwd"] and open_bwd is not None:
            bwd.append(t - open_bwd)
            last, open_bwd = t, None
        elif tag == "step:end":
            segments.append(t - last)
    return {"fwd_wait": fwd, "bwd_wait": bwd, "segments": segments, "step": marks[-1][1]}


def _traced_steps(model, step, trace, reps, barrier_sync) -> list[dict]:
    """``reps`` steps with every exchange traced (after one untraced step)."""
    local = model.graph.local
    saved = {role: le.exchange for role, le in local.items()}
    try:
        for role, le in local.items():
            if le.exchange is not None:
                le.exchange = _Traced(le.exchange, trace, role)
        out = []
        for _ in range(reps):
            barrier_sync()
            trace.start()
            step()
            out.append(_exchange_segments(trace.stop()))
        barrier_sync()
        return out
    finally:
        for role, le in local.items():
            le.exchange = saved[role]


def _solo_compute(model, step, args, cuda, barrier_sync, trace) -> dict | None:
    """This rank's forward + backward (and loss, optimizer) without any communication: halo
    exchanges replaced by zeros, the gradient reduction off, overlap off; with ``args.trace``
    also the compute between consecutive exchanges (:func:`_exchange_segments`). ``None`` with
    sharded parameters (FSDP's gathers are collectives: the ranks would still wait for each
    other)."""
    from contextlib import nullcontext

    from squall.parallel.sharding import is_sharded

    if is_sharded(model):
        return None
    local = model.graph.local
    saved = {role: le.exchange for role, le in local.items()}
    reducer = model.runner.grad_reducer
    overlap, model.runner.overlap = model.runner.overlap, False
    traced = None
    try:
        with reducer.no_sync() if reducer is not None else nullcontext():
            for le in local.values():
                if le.exchange is not None:
                    le.exchange = _NoExchange(le.exchange)
            step()
            barrier_sync()
            phases = []
            for _ in range(max(3, args.steps // 2)):
                marks = _Marks(cuda)
                step(marks)
                marks.sync()
                phases.append(marks.seconds())
            barrier_sync()
            if args.trace:
                traced = _traced_steps(model, step, trace, args.trace, barrier_sync)
    finally:
        for role, le in local.items():
            le.exchange = saved[role]
        model.runner.overlap = overlap
    med = [statistics.median(ph[i] for ph in phases) for i in range(4)]
    return {"forward_backward_s": med[0] + med[2] - med[1], "step_s": med[3], "traced": traced}


def _set_bucket(model, bucket_mb: float) -> None:
    """Give the model a :class:`GradReducer` with ``bucket_mb`` (when it has one)."""
    from squall.parallel.parallelize import GradReducer

    reducer = model.runner.grad_reducer
    if reducer is None or reducer.bucket_mb == bucket_mb:
        return
    reducer.remove()
    model.runner.grad_reducer = GradReducer(model, reducer.group, round(1 / reducer.scale),
                                            bucket_mb)  # fmt: skip


def exchange_analysis(ranks: list[dict]) -> dict:
    """Where the halo wait goes, from the traced steps of every rank (``{}`` without them).

    Per exchange ``k`` (medians over the traced steps), rank ``r`` waits ``w[r][k]`` on its
    compute stream. ``*_both_s``: sum over exchanges of the smallest wait, what even the last
    rank to arrive pays (pack, launch, transfer, unpack); ``*_skew_s``: sum of largest minus
    smallest, the time the earlier rank waits for the later one. ``solo_sync_imbalance_s``:
    from the solo run's compute between exchanges, sum over segments of the slowest rank's
    segment minus the slowest rank's total: what synchronising at every exchange costs when
    segments are unevenly split although the totals are balanced (it predicts the skew).
    """
    real = [r.get("traced") for r in ranks]
    solo = [(r.get("solo_compute_s") or {}).get("traced") for r in ranks]
    if len(ranks) < 2 or not all(real):
        return {}

    def med(steps, key):
        n = min(len(s[key]) for s in steps)
        return [statistics.median(s[key][k] for s in steps) for k in range(n)]

    def sync_cost(seg):
        n = min(len(x) for x in seg)
        path = sum(max(x[k] for x in seg) for k in range(n))
        return path - max(sum(x[:n]) for x in seg), path

    out = {}
    for d in ("fwd_wait", "bwd_wait"):
        w = [med(t, d) for t in real]
        n = min(len(x) for x in w)
        out[f"{d}_exchanges"] = n
        out[f"{d}_per_rank_s"] = [round(sum(x[:n]), 5) for x in w]
        out[f"{d}_both_s"] = round(sum(min(x[k] for x in w) for k in range(n)), 5)
        out[f"{d}_skew_s"] = round(sum(max(x[k] for x in w) - min(x[k] for x in w)
                                       for k in range(n)), 5)  # fmt: skip
        # how often each rank was the one that waited longest (arrived first)
        out[f"{d}_longest_wait_count"] = [sum(1 for k in range(n) if max(range(len(w)),
                                              key=lambda r, k=k: w[r][k]) == r0)
                                          for r0 in range(len(w))]  # fmt: skip
    out["real_sync_imbalance_s"] = round(sync_cost([med(t, "segments") for t in real])[0], 5)
    if all(solo):
        seg = [med(t, "segments") for t in solo]
        cost, path = sync_cost(seg)
        out["solo_sync_imbalance_s"] = round(cost, 5)
        out["solo_critical_path_s"] = round(path, 5)
        out["solo_rank_compute_s"] = [round(sum(x), 5) for x in seg]
    out["traced_step_s"] = [round(statistics.median(s["step"] for s in t), 5) for t in real]
    return out


def _count_step(model, x, y, opt, cuda, device) -> dict:
    """One forward + backward under :class:`squall.planning.memory.ActivationCounter`: bytes
    held after the forward (activations for the backward), the step's peak of what it allocates
    (activations, transients, gradients), and the largest tensors held after the forward."""
    from squall.planning.memory import count_step

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return area_weighted_mse(model(x), y, model.graph.area)

    opt.zero_grad(set_to_none=True)
    totals, counter = count_step(forward)
    opt.zero_grad(set_to_none=True)
    return {"held_GiB": totals["held_bytes"] / GIB, "peak_GiB": totals["peak_bytes"] / GIB,
            "top_after_forward": counter.breakdown("forward", 15)}  # fmt: skip


def breakdown(ranks: list[dict], i: int = 0) -> dict:
    """Step time of one row of a ``time`` run split into what scales and what does not, over the
    ranks' summaries.

    ``s_per_step``: slowest rank. ``fixed_s``: the loss, the optimizer step and host time the
    device stood idle (slowest rank each; none of it shrinks with P). ``imbalance``: max / mean
    of the ranks' forward + backward run alone (no exchange, no gradient reduction; 1 for one
    rank, ``nan`` with sharded parameters, whose gathers make the ranks wait for each other).
    ``halo_wait_s``: largest rank's real forward + backward minus its solo one (exchanges plus
    waiting for the slower peer; the gradient reduction of the backward included).
    """
    rows = [r["rows"][i] for r in ranks]
    fb = [r["forward_s"] + r["backward_s"] for r in rows]
    solo = [r.get("solo_compute_s") for r in ranks]
    if all(v is not None for v in solo):
        alone = [v["forward_backward_s"] for v in solo]
        imbalance = max(alone) / statistics.mean(alone)
        wait = max(f - a for f, a in zip(fb, alone, strict=True))
    elif len(ranks) == 1:
        imbalance, wait = 1.0, 0.0
    else:
        imbalance = wait = float("nan")
    return {
        "s_per_step": max(r["s_per_step"] for r in rows),
        "peak_GiB": max(r["peak_GiB"] for r in rows),
        "held_after_forward_GiB": max(r.get("held_after_forward_GiB", float("nan")) for r in rows),
        "state_GiB": max(r["state_GiB"] for r in ranks),
        "forward_backward_s": max(fb),
        "loss_s": max(r["loss_s"] for r in rows),
        "optimizer_s": max(r["optimizer_s"] for r in rows),
        "host_s": max(r["host_s"] for r in rows),
        "fixed_s": max(r["loss_s"] + r["optimizer_s"] + r["host_s"] for r in rows),
        "imbalance": imbalance,
        "halo_wait_s": wait,
        "halo_alone_s": max(r["halo_s"] for r in ranks),
        "grad_sync_alone_s": max(r.get("grad_sync_alone_s", 0.0) for r in ranks),
    }


def cmd_time(args) -> None:
    env = dist_env()
    init_distributed(env)
    cuda = env.backend == "nccl"
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def barrier_sync():
        sync()
        dist.barrier()

    t0 = time.perf_counter()
    if env.rank == 0:
        g = load_graph_spec(args.graph, args.cache)
    dist.barrier()
    if env.rank != 0:
        g = load_graph_spec(args.graph, args.cache)
    t_graph = time.perf_counter() - t0
    layout = Layout(env.world_size, env.world_size)
    groups = build_groups(layout)
    torch.manual_seed(0)
    ckpt = bool(args.checkpoint)
    mcfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                       processor_layers=args.layers, mlp_ratio=4, trainable_edge_features=8,
                       attention_backend=args.backend, checkpoint_encoder=ckpt,
                       checkpoint_processor=ckpt, checkpoint_decoder=ckpt,
                       compile=bool(args.compile))  # fmt: skip
    if args.compile and any(args.overlap) and env.world_size > 1:
        raise SystemExit("--compile 1 with --overlap 1: blocks that run on interior and boundary "
                         "subsets stay eager; time compiled blocks with --overlap 0")  # fmt: skip
    if args.budget_gib:
        # the checkpoint planner's policies for the budget, planned on the sizes of a world of
        # --plan-world ranks (default this run's: each world its own plan)
        plan_world = args.plan_world or env.world_size
        mcfg = dataclasses.replace(mcfg, checkpoint_encoder="none", checkpoint_decoder="none",
                                   checkpoint_processor="none", checkpoint_budget_gib=args.budget_gib)  # fmt: skip
        *_, mcfg = estimate(g, mcfg, ParallelConfig(plan_world), plan_world, args.batch,
                            (NUM_VARS, NUM_VARS))  # fmt: skip
    plan = describe_checkpointing(mcfg)
    if env.rank == 0:
        print(plan, flush=True)
    model = GraphForecaster(g, mcfg, NUM_VARS, NUM_VARS, 2,
                            residual_map=[(i, i) for i in range(NUM_VARS)]).to(device)  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.01)
    t1 = time.perf_counter()
    shard = bool(args.shard_parameters)
    pcfg = ParallelConfig(env.world_size, args.partition, overlap=bool(any(args.overlap)),
                          chunks=1, shard_parameters=shard, param_dtype="bf16" if cuda else "fp32",
                          grad_bucket_mb=args.bucket_mb[0])  # fmt: skip
    model = parallelize(model, g, pcfg, groups)
    t_plan = time.perf_counter() - t1
    n_local = model.graph.num_data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, 2, n_local, NUM_VARS, device=device, generator=gen)
    y = torch.randn(args.batch, n_local, NUM_VARS, device=device, generator=gen)

    def step(marks=None):
        """One training step; ``marks(i)`` (when given) records event ``i`` after each phase:
        0 start (gradients freed), 1 forward, 2 loss, 3 backward (with the gradient reduction),
        4 optimizer."""
        mark = marks or (lambda i: None)
        opt.zero_grad(set_to_none=True)  # host only: frees the gradients, launches nothing
        mark(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
            mark(1)
            loss = area_weighted_mse(out, y, model.graph.area)
        mark(2)
        loss.backward()
        mark(3)
        opt.step()
        mark(4)

    # one rank runs the model whole (no graph sharding, nothing exchanged)
    local = getattr(model.graph, "local", {})
    exchanges = [le.exchange for le in local.values() if le.exchange is not None]
    rows = []
    trace = _Trace(cuda)
    for overlap, bucket_mb in [(o, b) for o in args.overlap for b in args.bucket_mb]:
        model.runner.overlap = bool(overlap)
        _set_bucket(model, bucket_mb)
        for _ in range(args.warmup):
            step()
        barrier_sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sent0 = sum(e.bytes_sent for e in exchanges)
        times, phases, walls = [], [], []
        for _ in range(args.steps):
            marks = _Marks(cuda)
            t = time.perf_counter()
            step(marks)
            marks.sync()
            walls.append(time.perf_counter() - t)
            p = marks.seconds()
            times.append(p[-1])
            phases.append(p)
            dist.barrier()
        peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
        sent = (sum(e.bytes_sent for e in exchanges) - sent0) / args.steps
        med = [statistics.median(ph[i] for ph in phases) for i in range(4)]
        held = (marks.alloc[1] - marks.alloc[0]) / GIB if cuda else float("nan")
        # fixed per-step work: what does not shrink with P (zero_grad + forward launch gaps are in
        # forward; the loss, the optimizer step and the host time the device stood idle)
        rows.append({"overlap": bool(overlap), "bucket_mb": bucket_mb,
                     "s_per_step": statistics.median(times),
                     "s_per_step_max": max(times), "peak_GiB": peak,
                     "halo_bytes_sent_per_step": sent,
                     "held_after_forward_GiB": held,
                     "forward_s": med[0], "loss_s": med[1] - med[0],
                     "backward_s": med[2] - med[1], "optimizer_s": med[3] - med[2],
                     "host_s": max(0.0, statistics.median(walls) - statistics.median(times))})  # fmt: skip
    # imbalance: every rank's forward + backward alone, exchanges and gradient reduction
    # replaced by local no-ops (no collective, so no rank waits for another); the real step's
    # forward + backward minus this is the rank's halo wait (exchange + waiting for its peers)
    solo = _solo_compute(model, step, args, cuda, barrier_sync, trace) if local else None
    # every exchange of a few steps timed on each rank (first bucket size, no overlap)
    traced = None
    if args.trace and local:
        model.runner.overlap = False
        _set_bucket(model, args.bucket_mb[0])
        traced = _traced_steps(model, step, trace, args.trace, barrier_sync)
    # the gradient reduction of the step alone (all-reduce of GradReducer; FSDP's gathers and
    # reduce-scatters interleave with compute and are not separable this way)
    reducer = model.runner.grad_reducer
    grad_sync_s = 0.0
    if reducer is not None:
        grad_sync_s = _events_time(reducer.reduce, 5, barrier_sync)
    # each edge set's exchange alone (forward direction; the reverse moves the same rows back)
    halo_s = 0.0
    halo_detail = {}
    dtype = torch.bfloat16 if cuda else torch.float32
    for role, le in local.items():
        uses = args.layers if role == "processor" else 1
        if le.exchange is None:
            continue
        xr = torch.randn(args.batch, le.plan.num_owned_src, args.channels, device=device,
                         dtype=dtype)  # fmt: skip
        le.exchange.start(xr).wait()
        t = _events_time(lambda le=le, xr=xr: le.exchange.start(xr).wait(), 10, barrier_sync)
        halo_detail[role] = t
        halo_s += 2 * uses * t  # forward and backward
    state = local_state_bytes(model, opt)  # after a step: gradients and AdamW state exist
    counted = None
    if args.count:
        try:
            counted = _count_step(model, x, y, opt, cuda, device)
        except Exception as err:  # the timing above stands; say why the count is missing
            print(f"rank {env.rank}: activation count failed: {err!r}", flush=True)
    # slowest rank decides the step: gather and reduce on rank 0
    summary = {"rank": env.rank, "rows": rows, "halo_s": halo_s, "halo_detail": halo_detail,
               "solo_compute_s": solo, "grad_sync_alone_s": grad_sync_s, "count": counted,
               "traced": traced,
               "state_detail_GiB": {k: v / GIB for k, v in state.items()},
               "t_graph_s": t_graph, "t_plan_s": t_plan, "n_local_data": n_local,
               "n_local_mesh": model.graph.num_mesh,
               "state_GiB": state["total"] / GIB}  # fmt: skip
    if env.world_size == 1 and cuda and args.chunk_memory:
        summary["chunk_memory"] = _chunk_memory(g, mcfg, device, args)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, summary)
    if env.rank == 0:
        result = {"info": machine_info(), "gpus": env.world_size, "graph": args.graph,
                  "channels": args.channels, "heads": args.heads, "layers": args.layers,
                  "batch": args.batch, "backend": args.backend,
                  "checkpoint": f"planner {args.budget_gib:g} GiB" if args.budget_gib else ckpt,
                  "partition": args.partition, "ranks": gathered, "shard_parameters": shard,
                  "compile": mcfg.compile, "label": args.label, "checkpoint_plan": plan,
                  "budget_gib": args.budget_gib, "plan_world": args.plan_world,
                  "gflop_per_step": 3 * model.flops_per_sample() * args.batch / 1e9}  # fmt: skip
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"time_{env.world_size}.json").write_text(json.dumps(result))
        for i, r in enumerate(rows):
            b = breakdown(gathered, i)
            print(f"P={env.world_size} overlap={r['overlap']} bucket_mb={r['bucket_mb']} "
                  f"compile={mcfg.compile} "
                  f"shard_parameters={shard}: {b['s_per_step']:.4f} s/step, peak "
                  f"{b['peak_GiB']:.2f} GiB (state {b['state_GiB']:.3f}), fixed {b['fixed_s']:.4f} s "
                  f"(loss {b['loss_s']:.4f} opt {b['optimizer_s']:.4f} host {b['host_s']:.4f}), "
                  f"imbalance {b['imbalance']:.3f}, halo wait {b['halo_wait_s']:.4f} s, "
                  f"halo alone {b['halo_alone_s']:.4f} s, grad all-reduce alone "
                  f"{b['grad_sync_alone_s']:.4f} s", flush=True)  # fmt: skip
        ex = exchange_analysis(gathered)
        if ex:
            print("exchanges:", json.dumps(ex), flush=True)
    destroy_distributed()


def _chunk_memory(g, mcfg, device, args) -> dict:
    """Peak memory of one mapper block's forward + backward with chunks 1 and 4, on one GPU.

    Inputs, their gradient buffers' final values and the output gradient are allocated or
    counted apart: ``*_GiB`` is the peak above the inputs and the output gradient (activations,
    transients and the input gradients), ``*_transient_GiB`` the peak above the state after the
    backward (activations and transients only).
    """
    out = {}
    for chunks in (1, 4):
        torch.manual_seed(0)
        cfg = dataclasses.replace(mcfg, checkpoint_encoder=False, checkpoint_decoder=False,
                                  processor_layers=1)  # fmt: skip
        m = GraphForecaster(g, cfg, NUM_VARS, NUM_VARS, 2).to(device)
        m = parallelize(m, g, ParallelConfig(1, "sfc", chunks=chunks))
        gi = m.graph
        for role, n_src, n_dst in (("decoder", gi.num_mesh, gi.num_data),
                                   ("encoder", gi.num_data, gi.num_mesh)):  # fmt: skip
            xs = torch.randn(args.batch, n_src, args.channels, device=device, requires_grad=True)
            xd = torch.randn(args.batch, n_dst, args.channels, device=device, requires_grad=True)
            # fp32 like the block's output (the residual stream follows the fp32 inputs)
            grad_out = torch.randn(args.batch, n_dst, args.channels, device=device)
            edge = m.edge_inputs(role).detach()
            block = m.decoder if role == "decoder" else m.encoder
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                res = m.runner(gi, role, block, xs, xd, edge)
            res.backward(grad_out.to(res.dtype))
            del res
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device)
            final = torch.cuda.memory_allocated(device)
            out[f"{role}_chunks{chunks}_GiB"] = (peak - base) / GIB
            out[f"{role}_chunks{chunks}_transient_GiB"] = (peak - final) / GIB
            del xs, xd, grad_out
        del m
        torch.cuda.empty_cache()
    return out


def cmd_chunkmem(args) -> None:
    """Mapper memory with chunks 1 and 4 on one GPU (no process group): ``chunkmem.json``."""
    device = torch.device("cuda")
    g = load_graph_spec(args.graph, args.cache)
    mcfg = ModelConfig(num_channels=args.channels, num_heads=args.heads, processor_layers=1,
                       mlp_ratio=4, trainable_edge_features=8, attention_backend=args.backend)  # fmt: skip
    result = {"info": machine_info(), "graph": args.graph, "channels": args.channels,
              "backend": args.backend, "chunk_memory": _chunk_memory(g, mcfg, device, args)}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "chunkmem.json").write_text(json.dumps(result))
    print(result, flush=True)


# -- table: results of one device call -> profiling/results -------------------------------------


def cmd_table(args) -> None:
    src = Path(args.dir)
    runs = {}
    for p in sorted(src.glob("time_*.json")):
        r = json.loads(p.read_text())
        runs[r["gpus"]] = r
    if not runs:
        raise SystemExit(f"no time_*.json in {src}")
    base = runs.get(1)
    rows = []
    for gpus, r in sorted(runs.items()):
        ranks = r["ranks"]
        by = {row["overlap"]: i for i, row in enumerate(ranks[0]["rows"])}

        def worst(key, overlap, ranks=ranks, by=by):
            return max(s["rows"][by[overlap]][key] for s in ranks)

        t_on = worst("s_per_step", True) if True in by else float("nan")
        t_off = worst("s_per_step", False) if False in by else float("nan")
        halo_s = max(s["halo_s"] for s in ranks)
        hidden = (t_off - t_on) / halo_s if halo_s > 0 and np.isfinite(t_off) else float("nan")
        t1 = worst_t1 = None
        if base is not None:
            b_by = {row["overlap"]: i for i, row in enumerate(base["ranks"][0]["rows"])}
            worst_t1 = base["ranks"][0]["rows"][b_by[True]]["s_per_step"]
            t1 = worst_t1
        eff = t1 / (gpus * t_on) if t1 else float("nan")
        eff_off = t1 / (gpus * t_off) if t1 and np.isfinite(t_off) else float("nan")
        row = {**r["info"], "graph": r["graph"], "channels": r["channels"], "heads": r["heads"],
               "layers": r["layers"], "batch": r["batch"], "backend": r["backend"],
               "checkpoint": r["checkpoint"], "partition": r["partition"], "gpus": gpus,
               "s_per_step_overlap": round(t_on, 4), "s_per_step_no_overlap": round(t_off, 4),
               "strong_scaling_eff": round(eff, 3),
               "strong_scaling_eff_no_overlap": round(eff_off, 3),
               "peak_GiB_max": round(max(s["rows"][by[True]]["peak_GiB"] for s in ranks), 2),
               "halo_MB_per_step": round(sum(s["rows"][by[True]]["halo_bytes_sent_per_step"]
                                             for s in ranks) / 1e6, 2),
               "halo_alone_s": round(halo_s, 4), "hidden_share": round(hidden, 3),
               "tflops_per_gpu": round(r["gflop_per_step"] / 1e3 / t_on / gpus, 1),
               "plan_build_s": round(max(s["t_plan_s"] for s in ranks), 2),
               "shard_parameters": r.get("shard_parameters", False),
               "state_GiB_max": round(max(s.get("state_GiB", float("nan")) for s in ranks), 3)}  # fmt: skip
        cm = ranks[0].get("chunk_memory")
        if cm:
            row.update({k: round(v, 3) for k, v in cm.items()})
        rows.append(row)
    append_rows("parallel.csv", rows)
    info = rows[0]
    lines = [
        "# Model-parallel training step (profiling/bench_parallel.py time)",
        "",
        f"{info['date']} UTC, {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
        f"CUDA {info['cuda']}, git {info['git']}.",
        f"Graph {info['graph']}, {info['channels']} channels, {info['heads']} heads, "
        f"{info['layers']} processor layers, batch {info['batch']}, bf16 autocast, attention "
        f"backend {info['backend']}, checkpointing {info['checkpoint']}, partition "
        f"{info['partition']}; forward + backward + fused AdamW on random normalised data. "
        "s/step: median of CUDA-event times, slowest rank. Halo alone: every exchange of a step "
        "timed by itself (forward and reverse), slowest rank; hidden share = (t_no_overlap - "
        "t_overlap) / halo alone. Efficiency = t_1 / (P t_P).",
        "",
        "| GPUs | s/step overlap | s/step no overlap | efficiency overlap | efficiency no "
        "overlap | peak GiB (max rank) | halo MB/step | halo alone s | hidden share "
        "| TFLOP/s per GPU (overlap) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gpus']} | {r['s_per_step_overlap']} | {r['s_per_step_no_overlap']} "
            f"| {r['strong_scaling_eff']} | {r['strong_scaling_eff_no_overlap']} "
            f"| {r['peak_GiB_max']} | {r['halo_MB_per_step']} "
            f"| {r['halo_alone_s']} | {r['hidden_share']} | {r['tflops_per_gpu']} |"
        )
    cm = next((r for r in rows if "decoder_chunks1_GiB" in r), None)
    if cm:
        lines += ["", "Mapper peak memory, one GPU (forward + backward of one block):", "",
                  "| mapper | measure | chunks 1 GiB | chunks 4 GiB | ratio |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for role in ("encoder", "decoder"):
            for what, suffix in (("above inputs", ""), ("transient", "_transient")):
                a, b = cm.get(f"{role}_chunks1{suffix}_GiB"), cm.get(f"{role}_chunks4{suffix}_GiB")
                if a is not None and b is not None:
                    lines.append(f"| {role} | {what} | {a:.3f} | {b:.3f} | {a / b:.2f}x |")
    chk = src / "check.json"
    if chk.exists():
        c = json.loads(chk.read_text())
        lines += ["", "NCCL correctness (tiny O16/level-3 graph, `check`):", "",
                  "| world | model parallel | backend | overlap | exchange exact | forward bitwise "
                  "(all ranks) | max forward diff | max grad rel diff |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        keys = sorted({(r["world"], r["model_parallel"], r["backend"], r["overlap"])
                       for r in c["rows"]})  # fmt: skip
        for k in keys:
            rs = [r for r in c["rows"] if (r["world"], r["model_parallel"], r["backend"],
                                          r["overlap"]) == k]  # fmt: skip
            lines.append(
                f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {all(r['exchange_exact'] for r in rs)} "
                f"| {all(r['forward_bitwise'] for r in rs)} "
                f"| {max(r['forward_max_abs_diff'] for r in rs):.3g} "
                f"| {max(r['grad_max_rel_diff'] for r in rs):.3g} |"
            )
    md = RESULTS / "parallel.md"
    previous = md.read_text() if md.exists() else ""
    md.write_text("\n".join(lines) + "\n\n" + previous)
    print("\n".join(lines))


def _count_rank(rank, world, store, args):
    """One rank of ``count``: the model on this rank's part of the graph, one counted step."""
    import datetime

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))  # fmt: skip
    try:
        g = load_graph_spec(args.graph, args.cache)
        pol = "full" if args.checkpoint else "none"
        torch.manual_seed(0)
        mcfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                           processor_layers=args.layers, mlp_ratio=4, trainable_edge_features=8,
                           attention_backend="torch", checkpoint_encoder=pol,
                           checkpoint_processor=pol, checkpoint_decoder=pol)  # fmt: skip
        model = GraphForecaster(g, mcfg, NUM_VARS, NUM_VARS, 2,
                                residual_map=[(i, i) for i in range(NUM_VARS)])  # fmt: skip
        groups = build_groups(Layout(world, world)) if world > 1 else None
        if groups is None:
            from squall.parallel.parallelize import single_process_groups

            groups = single_process_groups()
        model = parallelize(model, g, ParallelConfig(world, "sfc"), groups)
        n = model.graph.num_data
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, 2, n, NUM_VARS, generator=gen)
        y = torch.randn(1, n, NUM_VARS, generator=gen)
        opt = torch.optim.AdamW(model.parameters())
        res = _count_step(model, x, y, opt, False, torch.device("cpu"))
        res.update(rank=rank, world=world, n_local_data=n, n_local_mesh=model.graph.num_mesh)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"count_{world}_{rank}.json").write_text(json.dumps(res))
    finally:
        if world > 1:
            dist.destroy_process_group()


def cmd_count(args) -> None:
    """Activation tensors of one step counted on CPU (gloo) at P = 1 and at P = ``--world``:
    held after the forward and the step's peak per rank, the largest tensors held, and the
    ratio of the largest rank to one process (``count_*.json`` in ``--out``)."""
    import tempfile
    import uuid

    import torch.multiprocessing as mp

    _count_rank(0, 1, None, args)
    store = Path(tempfile.gettempdir(), f"squall-count-{uuid.uuid4().hex}")
    try:
        mp.spawn(_count_rank, args=(args.world, str(store), args), nprocs=args.world, join=True)
    finally:
        store.unlink(missing_ok=True)
    one = json.loads(Path(args.out, "count_1_0.json").read_text())
    for r in range(args.world):
        c = json.loads(Path(args.out, f"count_{args.world}_{r}.json").read_text())
        print(f"P={args.world} rank {r}: held {c['held_GiB'] / one['held_GiB']:.3f}, peak "
              f"{c['peak_GiB'] / one['peak_GiB']:.3f} of one process's", flush=True)  # fmt: skip


def cmd_series(args) -> None:
    """``time`` runs of several directories -> one table: per run the step time, its split into
    fixed work, imbalance and halo wait, the strong-scaling efficiency against the one-GPU run of
    the same series (``--label``), memory per rank and the state share."""
    runs = []
    for d in args.dirs:
        for p in sorted(Path(d).glob("time_*.json")):
            runs.append(json.loads(p.read_text()))
    if not runs:
        raise SystemExit(f"no time_*.json in {args.dirs}")
    ones = {(r.get("label", ""), r["batch"]): r for r in runs if r["gpus"] == 1}
    rows = []
    for r in runs:
        for i, row in enumerate(r["ranks"][0]["rows"]):
            b = breakdown(r["ranks"], i)
            base = ones.get((r.get("label", ""), r["batch"]))
            b1 = breakdown(base["ranks"], 0) if base else None
            eff = b1["s_per_step"] / (r["gpus"] * b["s_per_step"]) if b1 else float("nan")
            count = [s.get("count") for s in r["ranks"]]
            state = [s.get("state_detail_GiB", {}) for s in r["ranks"]]
            out = {**r["info"], "label": r.get("label", ""), "graph": r["graph"],
                   "channels": r["channels"], "heads": r["heads"], "layers": r["layers"],
                   "batch": r["batch"], "backend": r["backend"], "checkpoint": r["checkpoint"],
                   "compile": r.get("compile", False), "partition": r["partition"],
                   "gpus": r["gpus"], "overlap": row["overlap"],
                   "bucket_mb": row.get("bucket_mb", 0.0),
                   "checkpoint_plan": r.get("checkpoint_plan", ""),
                   "shard_parameters": r.get("shard_parameters", False),
                   "strong_scaling_eff": round(eff, 3),
                   "peak_ratio_vs_1gpu": round(b["peak_GiB"] / b1["peak_GiB"], 3) if b1 else "",
                   **{k: round(v, 4) for k, v in b.items()},
                   "params_GiB": round(max(x.get("parameters", 0) for x in state), 3),
                   "grads_GiB": round(max(x.get("gradients", 0) for x in state), 3),
                   "optimizer_GiB": round(max(x.get("optimizer", 0) for x in state), 3)}  # fmt: skip
            if all(c is not None for c in count):
                out["counted_held_GiB"] = round(max(c["held_GiB"] for c in count), 3)
                out["counted_peak_GiB"] = round(max(c["peak_GiB"] for c in count), 3)
            rows.append(out)
    rows.sort(key=lambda o: (o["label"], o["gpus"], o["shard_parameters"], o["overlap"],
                             -o["bucket_mb"]))  # fmt: skip
    append_rows(args.csv, rows)
    info = rows[0]
    lines = [
        f"## {info['date']} UTC, {info['gpu']} x{max(o['gpus'] for o in rows)}, torch "
        f"{info['torch']}, triton {info['triton']}, git {info['git']}",
        "",
        f"`profiling/bench_parallel.py time` (series {args.dirs}): {info['graph']}, "
        f"{info['channels']} channels, {info['heads']} heads, {info['layers']} layers, batch "
        f"{info['batch']}, bf16 autocast, attention {info['backend']}, checkpointing "
        f"{info['checkpoint']}, partition {info['partition']}. s/step: median CUDA-event time, "
        "slowest rank. Fixed: loss + optimizer + host idle (slowest rank). Imbalance: max / mean "
        "of the ranks' forward + backward run without communication. Halo wait: real forward + "
        "backward minus that (exchanges, waiting for the peer, gradient all-reduce). State: "
        "parameters + gradients + AdamW state per rank.",
        "",
        "| series | GPUs | shard params | overlap | grad bucket MiB | s/step | efficiency | fwd+bwd s | fixed s (loss / opt "
        "/ host) | imbalance | halo wait s | halo alone s | grad all-reduce alone s | peak GiB "
        "| peak vs 1 GPU | held after fwd GiB | state GiB (param / grad / opt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in rows:
        lines.append(
            f"| {o['label'] or '-'} | {o['gpus']} | {o['shard_parameters']} | {o['overlap']} "
            f"| {o['bucket_mb'] if o['gpus'] > 1 else '-'} | {o['s_per_step']} "
            f"| {o['strong_scaling_eff']} | {o['forward_backward_s']} | {o['fixed_s']} "
            f"({o['loss_s']} / {o['optimizer_s']} / {o['host_s']}) | {o['imbalance']} "
            f"| {o['halo_wait_s']} | {o['halo_alone_s']} | {o['grad_sync_alone_s']} "
            f"| {o['peak_GiB']} | {o['peak_ratio_vs_1gpu']} | {o['held_after_forward_GiB']} "
            f"| {o['state_GiB']} ({o['params_GiB']} / {o['grads_GiB']} / {o['optimizer_GiB']}) |"
        )
    plans = sorted({(o["label"] or "-", o["gpus"], o["checkpoint_plan"]) for o in rows})
    lines += ["", "Checkpoint policies: " + "; ".join(f"{lab} P={g}: {p or 'as --checkpoint'}"
                                                    for lab, g, p in plans)]  # fmt: skip
    for r in runs:
        ex = exchange_analysis(r["ranks"])
        if ex:
            lines += ["", f"Exchanges traced ({r.get('label') or '-'}, P={r['gpus']}, s per step, "
                      "first bucket size, no overlap; see `exchange_analysis`): "
                      + ", ".join(f"{k} {v}" for k, v in ex.items())]  # fmt: skip
    counted = [(r, s) for r in runs for s in r["ranks"] if s.get("count")]
    if counted:
        lines += ["", "Counted activation tensors (squall.planning.memory, one step, GiB): held "
                  "after the forward / peak of forward + backward (gradients included); largest "
                  "groups held after the forward:", ""]  # fmt: skip
        for r, srank in counted:
            c = srank["count"]
            top = "; ".join(f"{t['op']} {t['shape']} {t['dtype']} x{t['count']} "
                            f"{t['bytes'] / GIB:.3f}" for t in c["top_after_forward"][:6])  # fmt: skip
            lines.append(f"- {r.get('label') or '-'} P={r['gpus']} shard={r['shard_parameters']} "
                         f"rank {srank['rank']}: {c['held_GiB']:.3f} / {c['peak_GiB']:.3f}; "
                         f"{top}")  # fmt: skip
    text = "\n".join(lines) + "\n"
    md = Path(args.md)
    previous = md.read_text() if md.exists() else ""
    md.write_text(text + "\n" + previous)
    print(text)


# -- shares: each rank's share of a partition timed alone, all on one GPU ----------------------


def _autotune_picks() -> dict:
    """The triton autotuner's choice per kernel and key in this process (``{}`` without)."""
    try:
        from squall.kernels.gt_attention import tuning
    except ImportError:
        return {}
    picks = {}
    for key, tuner in tuning.TUNED.items():
        for k, cfg in getattr(tuner, "cache", {}).items():
            picks[f"{key[0]} {k}"] = str(cfg)
    return picks


class _Share:
    """Model-parallel rank ``rank``'s share of ``partition``, on one device, no communication:
    the sharded model as :func:`parallelize` builds it for that rank (its rows, edges and halo
    plans; groups of one, so no gradient reduction), every exchange replaced by zeros of the
    halo's shape (:class:`_NoExchange`), its own AdamW and random inputs of its rows."""

    def __init__(self, g, mcfg, partition, rank: int, label: str, device, cuda: bool):
        from squall.distributed.layout import ProcessGroups

        parts = partition.num_parts
        torch.manual_seed(0)
        model = GraphForecaster(g, mcfg, NUM_VARS, NUM_VARS, 2,
                                residual_map=[(i, i) for i in range(NUM_VARS)]).to(device)  # fmt: skip
        torch.nn.init.normal_(model.head.weight, std=0.01)
        groups = ProcessGroups(Layout(parts, parts), rank, None, None, None)
        self.model = parallelize(model, g, ParallelConfig(parts, "sfc"), groups, partition)
        for le in self.model.graph.local.values():
            if le.exchange is not None:
                le.exchange = _NoExchange(le.exchange)
        self.rank, self.label, self.cuda, self.device = rank, label, cuda, device
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=cuda,
                                     foreach=not cuda)  # fmt: skip
        gen = torch.Generator(device=device).manual_seed(1 + rank)
        n = self.model.graph.num_data
        self.x = torch.randn(1, 2, n, NUM_VARS, device=device, generator=gen)
        self.y = torch.randn(1, n, NUM_VARS, device=device, generator=gen)
        self.counts = {role: {"edges": len(le.plan.edge_ids), "dst_rows": len(le.plan.owned_dst),
                              "owned_src_rows": le.plan.num_owned_src,
                              "local_src_rows": le.plan.num_local_src,
                              "halo_rows": le.plan.num_local_src - le.plan.num_owned_src}
                       for role, le in self.model.graph.local.items()}  # fmt: skip
        self.counts["owned"] = {"data": self.model.graph.num_data,
                                "mesh": self.model.graph.num_mesh}  # fmt: skip

    def step(self, marks=None) -> None:
        """One training step (marks as ``cmd_time``'s: 0 start, 1 forward, 2 loss, 3 backward,
        4 optimizer)."""
        mark = marks or (lambda i: None)
        self.opt.zero_grad(set_to_none=True)
        mark(0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            out = self.model(self.x)
            mark(1)
            loss = area_weighted_mse(out, self.y, self.model.graph.area)
        mark(2)
        loss.backward()
        mark(3)
        self.opt.step()
        mark(4)


def _paired(times: dict, a: str, b: str) -> dict:
    """Ratio ``b / a`` of two shares' step times, paired round by round (each round runs every
    share once, so slow drifts of the clock cancel): median and 10th / 90th percentiles."""
    r = np.array(times[b]) / np.array(times[a])
    return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
            "p90": float(np.percentile(r, 90)), "rounds": len(r)}  # fmt: skip


def cmd_shares(args) -> None:
    """Every rank's share of the ``--parts`` partition(s) of the graph timed alone, one after
    another in one process on one device, interleaved round by round (first share first in even
    rounds, last first in odd ones), with the counted rows, edges and work of each share.

    On one GPU this separates the partition's work from the card and link each rank runs on at
    P > 1: equal counts and equal times mean a rank-to-rank difference measured on several GPUs
    is not the partition's. All shares share this process's kernel autotune choices (keyed on
    shape classes equal for the shares); ``--ranks`` with one rank, in its own process, gives
    that rank's own choices (as a separate rank process makes them).
    """
    import torch._dynamo.config as dynamo_config

    from squall.parallel.parallelize import make_partition
    from squall.parallel.partition import measured_costs, part_work

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda:0" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        # every share compiles its blocks for its own static shapes: room for all of them (the
        # default limit of 8 entries per code object would send later shares' blocks eager)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 64)
    t0 = time.perf_counter()
    g = load_graph_spec(args.graph, args.cache)
    mcfg = ModelConfig(num_channels=args.channels, num_heads=args.heads,
                       processor_layers=args.layers, mlp_ratio=4, trainable_edge_features=8,
                       attention_backend=args.backend if cuda else "torch",
                       checkpoint_encoder="none", checkpoint_processor="none",
                       checkpoint_decoder="none", compile=bool(args.compile) and cuda)  # fmt: skip
    if args.budget_gib:
        mcfg = dataclasses.replace(mcfg, checkpoint_budget_gib=args.budget_gib)
        *_, mcfg = estimate(g, mcfg, ParallelConfig(args.parts), args.parts, 1,
                            (NUM_VARS, NUM_VARS))  # fmt: skip
    plan = describe_checkpointing(mcfg)
    print(plan, flush=True)
    costs = measured_costs(g, args.layers)
    partitions, counted = {}, {}
    for method in args.partitions:
        part = make_partition(g, ParallelConfig(args.parts, method), args.layers)
        same = [m for m, p in partitions.items()
                if all(np.array_equal(p.owner[n], part.owner[n]) for n in g.nodes)]  # fmt: skip
        counted[method] = [float(w) for w in part_work(g, part, costs)]
        if same:
            print(f"partition {method} = {same[0]}: not timed twice", flush=True)
            continue
        partitions[method] = part
    ranks = args.ranks if args.ranks else list(range(args.parts))
    shares = {}
    for method, part in partitions.items():
        for r in ranks:
            label = f"{method}/{r}"
            shares[label] = _Share(g, mcfg, part, r, label, device, cuda)
            print(f"{label}: {json.dumps(shares[label].counts)}", flush=True)
    t_build = time.perf_counter() - t0
    # warm-up (compile, autotune) share by share, timed
    warm = {}
    for label, sh in shares.items():
        t = time.perf_counter()
        for _ in range(args.warmup):
            sh.step()
        sync()
        warm[label] = time.perf_counter() - t
        print(f"{label}: warm-up {warm[label]:.1f} s", flush=True)
    picks = _autotune_picks()
    labels = list(shares)
    times = {k: [] for k in labels}
    fwd = {k: [] for k in labels}
    bwd = {k: [] for k in labels}
    for rnd in range(args.rounds):
        for label in labels if rnd % 2 == 0 else labels[::-1]:
            marks = _Marks(cuda)
            sync()
            shares[label].step(marks)
            marks.sync()
            p = marks.seconds()
            times[label].append(p[-1])
            fwd[label].append(p[0])
            bwd[label].append(p[2] - p[1])
    # every exchange point marked: compute per segment (embeddings, encoder, each processor
    # layer, decoder with loss and their backward), one traced step per share per round
    trace = _Trace(cuda)
    segments = {k: [] for k in labels}
    for rnd in range(args.trace):
        for label in labels if rnd % 2 == 0 else labels[::-1]:
            sh = shares[label]
            segments[label] += _traced_steps(sh.model, sh.step, trace, 1, sync)
    summary = {}
    for label in labels:
        seg = [
            statistics.median(s["segments"][k] for s in segments[label])
            for k in range(min((len(s["segments"]) for s in segments[label]), default=0))
        ]
        method, r = label.split("/")
        summary[label] = {"partition": method, "rank": int(r), "counts": shares[label].counts,
                          "counted_work_ms": counted[method][int(r)],
                          "step_s": times[label], "median_step_s": statistics.median(times[label]),
                          "median_forward_s": statistics.median(fwd[label]),
                          "median_backward_s": statistics.median(bwd[label]),
                          "warmup_s": warm[label], "segments_s": seg}  # fmt: skip
    ratios = {}
    for method in partitions:
        base = f"{method}/{ranks[0]}"
        for r in ranks[1:]:
            ratios[f"{method}/{r} over {base}"] = _paired(times, base, f"{method}/{r}")
    result = {"info": machine_info(), "graph": args.graph, "parts": args.parts,
              "channels": args.channels, "heads": args.heads, "layers": args.layers,
              "backend": mcfg.attention_backend, "compile": mcfg.compile,
              "checkpoint_plan": plan, "rounds": args.rounds, "build_s": t_build,
              "counted_work_ms": counted, "shares": summary, "paired_ratios": ratios,
              "autotune": picks, "argv": sys.argv}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "shares_" + "_".join(str(r) for r in ranks) + ".json"
    Path(args.out, name).write_text(json.dumps(result, indent=1))
    for label, s in summary.items():
        print(f"{label}: step {1e3 * s['median_step_s']:.2f} ms (fwd {1e3 * s['median_forward_s']:.2f}, "
              f"bwd {1e3 * s['median_backward_s']:.2f}), counted {s['counted_work_ms']:.2f} ms",
              flush=True)  # fmt: skip
    for k, v in ratios.items():
        print(f"{k}: {v['median']:.4f} (p10 {v['p10']:.4f}, p90 {v['p90']:.4f}, "
              f"{v['rounds']} rounds)", flush=True)  # fmt: skip
    print("autotune:", json.dumps(picks), flush=True)


def _model_args(sp, graph: str = "o320_l7", cache: str = "/tmp/squall-graphs",
                channels: int = 1024, heads: int = 16, layers: int | None = 16) -> None:  # fmt: skip
    """The graph and model-shape arguments of the modes that build a model (``layers`` None:
    no ``--layers``)."""
    sp.add_argument("--graph", default=graph)
    sp.add_argument("--cache", default=cache)
    sp.add_argument("--channels", type=int, default=channels)
    sp.add_argument("--heads", type=int, default=heads)
    if layers is not None:
        sp.add_argument("--layers", type=int, default=layers)


def main(argv=None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("partition")
    p.add_argument("--graphs", nargs="+", default=["o96_l6", "o320_l7"])
    p.add_argument("--parts", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--cache", default=str(REPO / ".cache" / "squall" / "graphs"))
    c = sub.add_parser("check")
    c.add_argument("--backends", nargs="+", default=["torch", "triton"])
    c.add_argument("--out", default="")
    c.add_argument("--bucket-mb", type=float, default=25.0, help="GradReducer bucket MiB")
    t = sub.add_parser("time")
    _model_args(t)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--backend", default="triton")
    t.add_argument("--checkpoint", type=int, default=1)
    t.add_argument("--partition", default="sfc")
    t.add_argument("--overlap", nargs="+", type=int, default=[1, 0])
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--chunk-memory", type=int, default=1)
    t.add_argument(
        "--shard-parameters",
        type=int,
        default=0,
        help="1: shard parameters, gradients and optimizer state (FSDP2)",
    )
    t.add_argument("--compile", type=int, default=0, help="1: torch.compile every block")
    t.add_argument(
        "--bucket-mb",
        nargs="+",
        type=float,
        default=[25.0],
        help="GradReducer bucket MiB, one row each (0: one all-reduce at the end)",
    )
    t.add_argument(
        "--budget-gib",
        type=float,
        default=0.0,
        help="checkpoint policies from the planner for this per-GPU budget (replaces --checkpoint)",
    )
    t.add_argument(
        "--plan-world",
        type=int,
        default=0,
        help="plan the checkpoint policies for this many ranks (0: this run's)",
    )
    t.add_argument(
        "--trace",
        type=int,
        default=0,
        help="steps with every exchange timed on every rank (real and solo)",
    )
    t.add_argument(
        "--count",
        type=int,
        default=0,
        help="1: count one step's activation tensors (squall.planning.memory)",
    )
    t.add_argument("--label", default="", help="series name in the results (e.g. eager, compiled)")
    t.add_argument("--out", required=True)
    cm = sub.add_parser("chunkmem")
    _model_args(cm, layers=None)
    cm.add_argument("--batch", type=int, default=1)
    cm.add_argument("--backend", default="triton")
    cm.add_argument("--out", required=True)
    tb = sub.add_parser("table")
    tb.add_argument("dir")
    co = sub.add_parser("count")
    _model_args(co, "o32_l4", str(REPO / ".cache" / "squall" / "graphs"), 64, 4, 4)
    co.add_argument("--checkpoint", type=int, default=1)
    co.add_argument("--world", type=int, default=2)
    co.add_argument("--out", required=True)
    sh = sub.add_parser("shares", help="each rank's share timed alone on one device")
    _model_args(sh)
    sh.add_argument("--backend", default="triton")
    sh.add_argument("--parts", type=int, default=2)
    sh.add_argument("--partitions", nargs="+", default=["sfc"], help="partition methods")
    sh.add_argument("--ranks", nargs="*", type=int, default=[], help="default: every rank")
    sh.add_argument("--compile", type=int, default=1)
    sh.add_argument(
        "--budget-gib",
        type=float,
        default=130.0,
        help="checkpoint policies from the planner for this budget (0: none)",
    )
    sh.add_argument("--warmup", type=int, default=3)
    sh.add_argument("--rounds", type=int, default=10)
    sh.add_argument("--trace", type=int, default=3, help="rounds of traced steps")
    sh.add_argument("--cpu", action="store_true", help="run on the CPU (code-path check)")
    sh.add_argument("--out", required=True)
    se = sub.add_parser("series")
    se.add_argument("dirs", nargs="+")
    se.add_argument("--csv", default="parallel.csv", help="results CSV to append to")
    se.add_argument("--md", default=str(RESULTS / "parallel_memory.md"))
    args = ap.parse_args(argv)
    {
        "partition": cmd_partition,
        "check": cmd_check,
        "time": cmd_time,
        "chunkmem": cmd_chunkmem,
        "table": cmd_table,
        "series": cmd_series,
        "count": cmd_count,
        "shares": cmd_shares,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
