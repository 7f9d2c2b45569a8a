"""Model-parallel benchmark: partition halo volume (plan only), NCCL correctness, and training-step
timing on 1, 2 and 4 GPUs.

    python profiling/bench_parallel.py partition                   # CPU, plans only
    torchrun --standalone --nproc_per_node=4 profiling/bench_parallel.py check
    torchrun --standalone --nproc_per_node=N profiling/bench_parallel.py time --out DIR
    python profiling/bench_parallel.py table DIR                   # DIR/*.json -> results/

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
                                    ParallelConfig(mp_degree, "sfc", overlap), groups)  # fmt: skip
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
                       checkpoint_processor=ckpt, checkpoint_decoder=ckpt)  # fmt: skip
    model = GraphForecaster(g, mcfg, NUM_VARS, NUM_VARS, 2,
                            residual_map=[(i, i) for i in range(NUM_VARS)]).to(device)  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.01)
    t1 = time.perf_counter()
    shard = bool(args.shard_parameters)
    pcfg = ParallelConfig(env.world_size, args.partition, overlap=True, chunks=1,
                          shard_parameters=shard, param_dtype="bf16" if cuda else "fp32")  # fmt: skip
    model = parallelize(model, g, pcfg, groups)
    t_plan = time.perf_counter() - t1
    n_local = model.graph.num_data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, foreach=not cuda)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, 2, n_local, NUM_VARS, device=device, generator=gen)
    y = torch.randn(args.batch, n_local, NUM_VARS, device=device, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(x)
        area_weighted_mse(out, y, model.graph.area).backward()
        opt.step()

    # one rank runs the model whole (no graph sharding, nothing exchanged)
    local = getattr(model.graph, "local", {})
    exchanges = [le.exchange for le in local.values() if le.exchange is not None]
    rows = []
    for overlap in args.overlap:
        model.runner.overlap = bool(overlap)
        for _ in range(args.warmup):
            step()
        barrier_sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sent0 = sum(e.bytes_sent for e in exchanges)
        times = []
        for _ in range(args.steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            dist.barrier()
        peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else float("nan")
        sent = (sum(e.bytes_sent for e in exchanges) - sent0) / args.steps
        rows.append({"overlap": bool(overlap), "s_per_step": statistics.median(times),
                     "s_per_step_max": max(times), "peak_GiB": peak,
                     "halo_bytes_sent_per_step": sent})  # fmt: skip
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
    # slowest rank decides the step: gather and reduce on rank 0
    summary = {"rank": env.rank, "rows": rows, "halo_s": halo_s, "halo_detail": halo_detail,
               "t_graph_s": t_graph, "t_plan_s": t_plan, "n_local_data": n_local,
               "n_local_mesh": model.graph.num_mesh,
               "state_GiB": local_state_bytes(model, opt)["total"] / GIB}  # fmt: skip
    if env.world_size == 1 and cuda and args.chunk_memory:
        summary["chunk_memory"] = _chunk_memory(g, mcfg, device, args)
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, summary)
    if env.rank == 0:
        result = {"info": machine_info(), "gpus": env.world_size, "graph": args.graph,
                  "channels": args.channels, "heads": args.heads, "layers": args.layers,
                  "batch": args.batch, "backend": args.backend, "checkpoint": ckpt,
                  "partition": args.partition, "ranks": gathered, "shard_parameters": shard,
                  "gflop_per_step": 3 * model.flops_per_sample() * args.batch / 1e9}  # fmt: skip
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"time_{env.world_size}.json").write_text(json.dumps(result))
        for r in rows:
            print(f"P={env.world_size} overlap={r['overlap']} "
                  f"{max(s['rows'][rows.index(r)]['s_per_step'] for s in gathered):.4f} s/step "
                  f"peak {max(s['rows'][rows.index(r)]['peak_GiB'] for s in gathered):.2f} GiB "
                  f"halo {sum(s['rows'][rows.index(r)]['halo_bytes_sent_per_step'] for s in gathered) / 1e6:.1f} MB/step "
                  f"halo alone {max(s['halo_s'] for s in gathered):.4f} s "
                  f"state {max(s['state_GiB'] for s in gathered):.3f} GiB "
                  f"shard_parameters={shard}", flush=True)  # fmt: skip
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
    t = sub.add_parser("time")
    t.add_argument("--graph", default="o320_l7")
    t.add_argument("--cache", default="/tmp/squall-graphs")
    t.add_argument("--channels", type=int, default=1024)
    t.add_argument("--heads", type=int, default=16)
    t.add_argument("--layers", type=int, default=16)
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
    t.add_argument("--out", required=True)
    cm = sub.add_parser("chunkmem")
    cm.add_argument("--graph", default="o320_l7")
    cm.add_argument("--cache", default="/tmp/squall-graphs")
    cm.add_argument("--channels", type=int, default=1024)
    cm.add_argument("--heads", type=int, default=16)
    cm.add_argument("--batch", type=int, default=1)
    cm.add_argument("--backend", default="triton")
    cm.add_argument("--out", required=True)
    tb = sub.add_parser("table")
    tb.add_argument("dir")
    args = ap.parse_args(argv)
    {
        "partition": cmd_partition,
        "check": cmd_check,
        "time": cmd_time,
        "chunkmem": cmd_chunkmem,
        "table": cmd_table,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
