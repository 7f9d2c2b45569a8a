"""Benchmark GT attention (forward + backward) on the AIFS graphs, squall against Anemoi; rows to a CSV.

Providers: ``ref_eager`` (the pure-torch reference), ``ref_compiled`` (the same under
``torch.compile``), ``triton`` / ``triton_fused`` (squall's degree-class kernels, materialised
``edge [E, H, C]`` / ``edge_attr [E, d_e]`` with ``W``, ``b`` projected inside the kernel),
``flat`` / ``flat_fused`` (squall's one-launch-per-pass kernels, ``tuning.KERNEL_DESIGN="flat"``),
``anemoi`` (the Triton kernel of anemoi-models 0.19.0, ``anemoi.models.triton.gt``, same inputs)
and ``anemoi_proj`` (Anemoi's kernel after the edge projection ``edge_attr @ W + b``, timed
together, forward + backward including dW: what a model on Anemoi's kernel runs for squall's fused
call). The Anemoi providers are skipped with a note where anemoi-models is not importable or
there is no GPU (its ops are CUDA-only); only its ``triton/gt.py`` module is imported.

Graphs: era_to_h (encoder, cutoff; ``--encoder-factor`` times the mesh spacing, 1.2 by default:
"twice the o96_l6 radius" of the comparison that asked for this benchmark), h_to_h (processor,
multi-scale), h_to_era (decoder, knn 3) of o96_l6 (H=16, C=64) and o320_l7 (H=16, C=32), built by
``squall.graphs`` from ``conf/graph/*.yaml`` (synthetic graphs of the same sizes and degrees when
that package is not importable; the ``graph_source`` column says which).

Columns: median ms of one forward + backward, achieved GB/s over the byte floor, ratio of the time
to the floor time (floor bytes / copy bandwidth measured on the same card in the same run), peak
memory above the inputs, GPU kernels one forward + backward launches (torch.profiler). Byte floor:
forward reads q, k, v, e and writes out; backward reads q, k, v, e, out, dO and writes dq, dk, dv,
de, each once (fused: e -> edge_attr plus W, b; dW, db).

Usage::

    python profiling/bench_attention.py --csv profiling/results/attention_vs_anemoi.csv
    python profiling/bench_attention.py --render profiling/results/attention_vs_anemoi.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

from squall.kernels import gt_attention as gta
from squall.kernels.edge_index import EdgeIndex
from squall.kernels.gt_attention import backward, forward, op, tuning

REPO = Path(__file__).resolve().parents[1]
GRAPHS = {"o96_l6": (16, 64), "o320_l7": (16, 32), "tiny": (3, 12)}  # tiny: CPU smoke test
ROLES = {"era_to_h": "encoder", "h_to_h": "processor", "h_to_era": "decoder"}
# Edge features of the model: 3 geometric attributes + 8 trainable (conf/model/o96.yaml).
D_E = 11
PROVIDERS = (
    "ref_eager", "ref_compiled", "triton", "triton_fused", "flat", "flat_fused", "anemoi",
    "anemoi_proj",
)  # fmt: skip
FUSED_PROVIDERS = ("triton_fused", "flat_fused", "anemoi_proj")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FIELDS = [
    "date", "gpu", "torch", "triton", "git_sha", "graph", "graph_source", "edges_name", "n_src",
    "n_dst", "n_edges", "heads", "chans", "d_e", "dtype", "provider", "median_ms", "floor_ms",
    "ratio_to_floor", "achieved_GBps", "copy_GBps", "peak_above_inputs_MiB", "max_rel_err",
    "launches", "encoder_factor", "anemoi_models",
]  # fmt: skip


def anemoi_gt():
    """Anemoi's ``triton/gt.py`` module and its version, or ``(None, why)``."""
    if not torch.cuda.is_available():
        return None, "no GPU (Anemoi's ops are CUDA-only)"
    try:
        from importlib.metadata import version

        from anemoi.models.triton import gt

        return gt, version("anemoi-models")
    except Exception as exc:  # noqa: BLE001 - any failure means: skip the provider, say why
        return None, f"anemoi-models not importable ({exc!r})"


@contextlib.contextmanager
def kernel_design(design: str):
    """Run squall's Triton backend with ``design`` ("classes" or "flat") inside the block."""
    old = tuning.KERNEL_DESIGN
    tuning.KERNEL_DESIGN = design
    try:
        yield
    finally:
        tuning.KERNEL_DESIGN = old


def synthetic_csc(n_src: int, n_dst: int, degrees: torch.Tensor, gen: torch.Generator):
    """Random local-ish CSC graph: destination d draws sources near d * n_src / n_dst."""
    colptr = torch.zeros(n_dst + 1, dtype=torch.int64)
    colptr[1:] = torch.cumsum(degrees, 0)
    centre = torch.repeat_interleave(torch.arange(n_dst) * n_src // n_dst, degrees)
    row = (centre + torch.randint(-32, 33, centre.shape, generator=gen)).clamp(0, n_src - 1)
    return colptr, row


def load_graphs(name: str, encoder_factor: float | None = None):
    """``{role: (colptr, row, n_src, source)}`` from squall.graphs, else synthetic of equal size."""
    try:
        if name == "tiny":
            raise KeyError("tiny is synthetic")
        import yaml

        from squall.graphs import build_graph

        spec = yaml.safe_load((REPO / "conf" / "graph" / f"{name}.yaml").read_text())
        if encoder_factor is not None:
            spec["edges"]["encoder"]["factor"] = encoder_factor
        graph = build_graph(spec)
        out = {}
        for role, key in ROLES.items():
            es = graph.edges[key]
            colptr = torch.as_tensor(es.colptr, dtype=torch.int64)
            out[role] = (colptr, torch.as_tensor(es.row, dtype=torch.int64), es.num_src, "squall")
        return out
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the rows
        print(f"squall.graphs unavailable ({exc!r}); synthetic graphs of the same sizes")
    gen = torch.Generator().manual_seed(0)
    grid, mesh = {"o96_l6": (40320, 40962), "o320_l7": (421120, 163842), "tiny": (50, 40)}[name]
    hh_edges = {"o96_l6": 327660, "o320_l7": 1310700, "tiny": 320}[name]
    out = {}
    deg = torch.randint(2, 7, (mesh,), generator=gen)
    out["era_to_h"] = (*synthetic_csc(grid, mesh, deg, gen), grid, "synthetic")
    deg = torch.full((mesh,), hh_edges // mesh)
    deg[: hh_edges - int(deg.sum())] += 1
    deg[:12] += 30  # the coarse-level nodes of a multi-scale mesh
    deg[12 : 12 + 360] -= 1
    deg[-1] = max(0, int(deg[-1]) - 1)
    out["h_to_h"] = (*synthetic_csc(mesh, mesh, deg, gen), mesh, "synthetic")
    out["h_to_era"] = (*synthetic_csc(mesh, grid, torch.full((grid,), 3), gen), mesh, "synthetic")
    return out


def copy_bandwidth_GBps(device) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written over median time."""
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def floor_bytes(n_src, n_dst, n_edges, h, c, itemsize, fused: bool, d_e: int) -> dict:
    """Fewest bytes each pass must move: every input read once, every output written once."""
    row_dst = n_dst * h * c * itemsize
    row_src = n_src * h * c * itemsize
    if fused:
        edge = n_edges * d_e * itemsize + (d_e + 1) * h * c * itemsize  # edge_attr and W, b
    else:
        edge = n_edges * h * c * itemsize
    fwd = row_dst + 2 * row_src + edge + row_dst  # q, k, v, e -> out
    bwd = 3 * row_dst + 2 * row_src + edge + row_dst + 2 * row_src + edge  # q, out, dO, k, v, e
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}  # -> dq, dk, dv, de


def median_ms(fn, warmup: int, rep: int, grad_to_none=None) -> float:
    """Median wall time of ``fn``: CUDA events through triton's do_bench, else a host clock."""
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(
            fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"
        )
    import time

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def breakdown(index, x, grad_out, fused: bool, copy_bw: float, warmup: int, rep: int) -> str:
    """Time the Triton forward and backward launchers alone, each against its own floor."""
    kt, dc, sc = op.kidx_args(index)
    q, k, v = x["q"], x["k"], x["v"]
    if fused:
        wb = (x["weight"], x["bias"])
        edge, attr = None, x["attr"]
    else:
        edge, attr, wb = x["edge"], None, None
    n_src, (n_dst, h, c) = k.shape[0], q.shape
    fb = floor_bytes(n_src, n_dst, index.num_edges, h, c, 2, fused, D_E)
    bwd_idx = (kt[1], kt[3], kt[4], kt[5], kt[6])  # row, csr_perm, csr_dst, dst/src schedules
    _, lse = forward.launch_fwd(q, k, v, edge, attr, wb, kt[1], kt[5], dc)
    t_f = median_ms(lambda: forward.launch_fwd(q, k, v, edge, attr, wb, kt[1], kt[5], dc),
                    warmup, rep)  # fmt: skip
    t_b = median_ms(lambda: backward.launch_bwd(q, k, v, edge, attr, wb, lse, grad_out, bwd_idx, dc, sc),
                    warmup, rep)  # fmt: skip
    f_f = fb["fwd"] / (copy_bw * 1e9) * 1e3
    f_b = fb["bwd"] / (copy_bw * 1e9) * 1e3
    return f"fwd {t_f:.3f} ms (x{t_f / f_f:.2f} floor)  bwd {t_b:.3f} ms (x{t_b / f_b:.2f} floor)"


def make_case(colptr, row, n_src, h, c, dtype, device, gen):
    index = EdgeIndex.from_csc(colptr, row, n_src).to(device)
    n_dst, n_edges = index.num_dst, index.num_edges

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    x = {
        "q": rnd(n_dst, h, c), "k": rnd(n_src, h, c), "v": rnd(n_src, h, c),
        "edge": rnd(n_edges, h, c), "attr": rnd(n_edges, D_E),
        "weight": rnd(D_E, h * c, scale=D_E**-0.5), "bias": rnd(h * c, scale=0.1),
    }  # fmt: skip
    grad_out = rnd(n_dst, h, c)
    return index, x, grad_out


def provider_fn(provider, index, x, grad_out, compiled_ref, anemoi=None):
    """A closure running forward + backward once, and the dict of leaves it differentiates."""
    design = "flat" if provider.startswith("flat") else "classes"
    if provider in ("triton_fused", "flat_fused"):
        names = ["q", "k", "v", "attr", "weight", "bias"]

        def fwd(t):
            return gta.gt_attention_fused(
                t["q"], t["k"], t["v"], t["attr"], t["weight"], t["bias"], index, "triton"
            )
    elif provider.startswith("anemoi"):
        csc = (index.row, index.colptr)
        reverse = (index.rowptr, index.csr_perm, index.dst)
        heads = x["q"].shape[1]
        if provider == "anemoi_proj":
            names = ["q", "k", "v", "attr", "weight", "bias"]

            def fwd(t):
                edge = gta.project_edges(t["attr"], t["weight"], t["bias"], heads)
                return anemoi.graph_transformer_attention_conv(
                    t["q"], t["k"], t["v"], edge, csc, reverse
                )
        else:
            names = ["q", "k", "v", "edge"]

            def fwd(t):
                return anemoi.graph_transformer_attention_conv(
                    t["q"], t["k"], t["v"], t["edge"], csc, reverse
                )
    else:
        names = ["q", "k", "v", "edge"]
        if provider in ("triton", "flat"):

            def fwd(t):
                return gta.gt_attention(t["q"], t["k"], t["v"], t["edge"], index, "triton")
        else:
            ref = compiled_ref if provider == "ref_compiled" else gta.gt_attention_reference

            def fwd(t):
                return ref(t["q"], t["k"], t["v"], t["edge"], index.colptr, index.row, index.dst)

    leaves = {n: x[n].detach().requires_grad_(True) for n in names}

    def step():
        with kernel_design(design):
            out = fwd(leaves)
            out.backward(grad_out)
        return out

    return step, leaves


def max_rel_err(provider, index, x, grad_out, compiled_ref, anemoi=None) -> float:
    """Worst over out and grads of err(provider) / (2 err(torch same dtype) + atol), all vs fp32
    (atol: half an ulp of the 16-bit format, as in tests/kernels)."""
    step, leaves = provider_fn(provider, index, x, grad_out, compiled_ref, anemoi)
    out = step().detach()
    res = [out] + [leaves[n].grad for n in leaves]

    def ref_run(t, fused):
        names = ["q", "k", "v", "attr", "weight", "bias"] if fused else ["q", "k", "v", "edge"]
        lv = {n: t[n].detach().clone().requires_grad_(True) for n in names}
        if fused:
            o = gta.gt_attention_fused(
                lv["q"], lv["k"], lv["v"], lv["attr"], lv["weight"], lv["bias"], index, "torch"
            )
        else:
            o = gta.gt_attention(lv["q"], lv["k"], lv["v"], lv["edge"], index, "torch")
        o.backward(grad_out.to(o.dtype))
        return [o.detach()] + [lv[n].grad for n in names]

    fused = provider in FUSED_PROVIDERS
    atol = {torch.bfloat16: 4e-3, torch.float16: 5e-4}[x["q"].dtype]
    exact = ref_run({n: t.float() for n, t in x.items()}, fused)
    same = ref_run(x, fused)
    worst = 0.0
    for a, s, r in zip(res, same, exact, strict=True):
        scale = r.abs().max().clamp_min(1e-30)
        e_k = ((a.float() - r).abs().max() / scale).item()
        e_t = ((s.float() - r).abs().max() / scale).item()
        worst = max(worst, e_k / (2 * e_t + atol))
    return worst


def count_launches(step) -> int | str:
    """GPU kernels one call of ``step`` launches (torch.profiler), or "" without a GPU."""
    if not torch.cuda.is_available():
        return ""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_above_inputs_MiB(step) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _precompile_one(job) -> str:
    """Worker: run fwd + bwd once on a regular graph of one degree (fills triton's cache)."""
    h, c, fused, degree, dtype, design = job
    n = 64
    colptr = torch.arange(n + 1, dtype=torch.int64) * degree
    row = (torch.arange(n)[:, None] + torch.arange(degree)[None, :]).remainder(n).flatten()
    gen = torch.Generator().manual_seed(0)
    index, x, grad_out = make_case(colptr, row, n, h, c, DTYPES[dtype], "cuda", gen)
    provider = ("flat" if design == "flat" else "triton") + ("_fused" if fused else "")
    step, _ = provider_fn(provider, index, x, grad_out, None)
    step()
    torch.cuda.synchronize()
    return f"H{h} C{c} fused={fused} degree={degree} {dtype} {design}"


def precompile(graphs, dtypes, designs) -> None:
    """Compile every autotune candidate in parallel processes before timing (cold cache: ~1 s per
    variant in one process, ~100 variants per dtype for the degree-class design)."""
    import multiprocessing as mp
    import time

    from squall.kernels.edge_index import DEGREE_CLASS_CAPS

    degrees = [3, 6, 12, 2 * DEGREE_CLASS_CAPS[-1] - 4]  # one per degree class
    jobs = [
        (*GRAPHS[g], f, d, dt, design)
        for g in graphs
        for f in (False, True)
        for dt in dtypes
        for design in designs
        for d in (degrees if design == "classes" else [6])
    ]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(min(len(jobs), 16)) as pool:
        for _ in pool.imap_unordered(_precompile_one, jobs):
            pass
    print(f"precompiled {len(jobs)} jobs in {time.perf_counter() - t0:.0f} s", flush=True)


def bench(args):
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = 64
    compiled_ref = torch.compile(gta.gt_attention_reference, dynamic=False)
    providers = list(args.providers)
    anemoi, anemoi_version = anemoi_gt()
    if anemoi is None and any(p.startswith("anemoi") for p in providers):
        print(f"skipping the Anemoi providers: {anemoi_version}", flush=True)
        providers = [p for p in providers if not p.startswith("anemoi")]
        anemoi_version = ""
    if args.precompile and device.type == "cuda":
        designs = [d for d, pre in (("classes", "triton"), ("flat", "flat"))
                   if any(p.startswith(pre) for p in providers)]  # fmt: skip
        if designs:
            precompile(args.graphs, args.dtypes, designs)
    copy_bw = copy_bandwidth_GBps(device) if device.type == "cuda" else 1.0
    print(f"copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu-interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        # the device copy's .git (if any) is not this checkout's: the caller passes the sha
        "git_sha": os.environ.get("SQUALL_GIT_SHA") or sha or "unknown",
        "encoder_factor": args.encoder_factor,
        "anemoi_models": anemoi_version,
    }
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)

    def append(row_):  # one row at a time, so a run cut short keeps what it measured
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row_)

    gen = torch.Generator().manual_seed(0)
    for gname in args.graphs:
        h, c = GRAPHS[gname]
        graphs = load_graphs(gname, args.encoder_factor)
        for role in args.roles:
            colptr, row, n_src, source = graphs[role]
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                index, x, grad_out = make_case(colptr, row, n_src, h, c, dtype, device, gen)
                for provider in providers:
                    if provider == "ref_compiled" and (
                        dname not in args.compiled_dtypes or gname not in args.compiled_graphs
                    ):
                        continue
                    try:
                        run_provider(
                            args, provider, gname, role, source, dname, index, x, grad_out,
                            compiled_ref, anemoi, copy_bw, meta, append,
                        )  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - one failing provider: record, go on
                        print(f"{gname} {role} {dname} {provider}: FAILED {exc!r}"[:2000])
                        traceback.print_exc(limit=3)
                        torch.cuda.empty_cache()
                del index, x, grad_out
                torch.cuda.empty_cache()
    render(path)


def run_provider(args, provider, gname, role, source, dname, index, x, grad_out, compiled_ref,
                 anemoi, copy_bw, meta, append) -> None:  # fmt: skip
    """Time one provider on one graph and dtype; append its row."""
    n_dst, h, c = x["q"].shape
    n_src = x["k"].shape[0]
    fused = provider in FUSED_PROVIDERS
    itemsize = x["q"].element_size()
    fb = floor_bytes(n_src, n_dst, index.num_edges, h, c, itemsize, fused, D_E)["total"]
    step, leaves = provider_fn(provider, index, x, grad_out, compiled_ref, anemoi)
    step()  # compile / autotune
    sync()
    err = ""
    if args.check and not provider.startswith("ref"):
        err = max_rel_err(provider, index, x, grad_out, compiled_ref, anemoi)
    for t in leaves.values():
        t.grad = None
    launches = count_launches(step) if args.launches else ""
    for t in leaves.values():
        t.grad = None
    peak = peak_above_inputs_MiB(step)
    ms = median_ms(step, args.warmup, args.rep, list(leaves.values()))
    floor_ms = fb / (copy_bw * 1e9) * 1e3
    row_ = dict(
        meta, graph=gname, graph_source=source, edges_name=role, n_src=n_src,
        n_dst=n_dst, n_edges=index.num_edges, heads=h, chans=c, d_e=D_E,
        dtype=dname, provider=provider, median_ms=f"{ms:.4f}",
        floor_ms=f"{floor_ms:.4f}", ratio_to_floor=f"{ms / floor_ms:.2f}",
        achieved_GBps=f"{fb / (ms * 1e-3) / 1e9:.0f}", copy_GBps=f"{copy_bw:.0f}",
        peak_above_inputs_MiB=f"{peak:.0f}",
        max_rel_err=f"{err:.2f}" if err != "" else "", launches=launches,
    )  # fmt: skip
    append(row_)
    print(
        f"{gname:8s} {role:9s} {dname} {provider:13s} {ms:9.3f} ms  floor {floor_ms:7.3f} "
        f"x{ms / floor_ms:5.2f}  peak {peak:7.0f} MiB  err/tol {row_['max_rel_err']:5s} "
        f"launches {launches}",
        flush=True,
    )
    if args.show_configs and provider.startswith(("triton", "flat")):
        for (kern, cls, _, fused_), tuner in sorted(tuning.TUNED.items(), key=str):
            best = getattr(tuner, "best_config", None)
            if best is not None and fused_ == fused:
                print(f"    {kern:12s} class {cls}: {best}")
    if args.breakdown and provider.startswith(("triton", "flat")):
        with kernel_design("flat" if provider.startswith("flat") else "classes"):
            print("    " + breakdown(index, x, grad_out, fused, copy_bw, args.warmup, args.rep))


def render(path: Path) -> None:
    """Markdown beside the CSV: every row, then the latest comparison per graph and dtype."""
    with Path(path).open() as fh:
        rows = list(csv.DictReader(fh))
    cols = [
        "date", "gpu", "git_sha", "graph", "edges_name", "n_edges", "heads", "chans", "dtype",
        "provider", "median_ms", "achieved_GBps", "ratio_to_floor", "peak_above_inputs_MiB",
        "max_rel_err", "launches",
    ]  # fmt: skip
    lines = [
        "# GT attention benchmark (forward + backward)",
        "",
        f"Generated by `profiling/bench_attention.py` from `{Path(path).name}`; `ratio_to_floor` "
        "is time over (byte floor / copy bandwidth measured in the same run); `max_rel_err` is "
        "the worst err(kernel) / (2 err(torch same dtype) + atol) over out and grads vs fp32 "
        "(<= 1 passes); `launches`: GPU kernels of one forward + backward, the provider's own "
        "and torch's (projection, casts, reductions).",
        "",
    ]
    lines += summary_lines(rows)
    lines += ["", "## Every row", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    Path(path).with_suffix(".md").write_text("\n".join(lines) + "\n")


def readme_lines(rows) -> list[str]:
    """README table: squall's default kernels (fused: the model's path; materialised) against
    Anemoi's and the compiled reference, bf16, with the ratios the targets name. squall's and
    Anemoi's rows come from the latest run that timed all four on a graph (one call, one card);
    the compiled reference's from its latest row. The line below gives the fp16 ratios and the
    cards and commits."""

    def latest_call(dtype):
        calls = {}
        for r in rows:
            if r.get("dtype", "bf16") == dtype:
                key = (r["graph"], r["edges_name"], r["gpu"], r["git_sha"], r["date"][:13])
                calls.setdefault(key, {})[r["provider"]] = r
        out = {}
        for (g, e, *_), provs in calls.items():
            if all(p in provs for p in ("flat", "flat_fused", "anemoi", "anemoi_proj")):
                out[(g, e)] = provs  # later rows win
        for r in rows:
            if r.get("dtype", "bf16") == dtype and r["provider"] == "ref_compiled":
                out.setdefault((r["graph"], r["edges_name"]), {})["ref_compiled"] = r
        return out

    def ms(provs, p):
        r = provs.get(p)
        return float(r["median_ms"]) if r else None

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b is not None else ""

    bf16, fp16 = latest_call("bf16"), latest_call("fp16")
    out = [
        "| graph | edges | E | fused (model path) | Anemoi proj. + kernel | fused / Anemoi + proj. "
        "| materialised | Anemoi kernel | materialised / Anemoi | compiled reference "
        "| fused / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cards, fp16_fused, fp16_mat = set(), [], []
    for (g, e), provs in bf16.items():
        if "flat" not in provs:
            continue
        t = {p: ms(provs, p) for p in ("flat_fused", "anemoi_proj", "flat", "anemoi",
                                       "ref_compiled")}  # fmt: skip
        for p, r in provs.items():
            cards.add(f"{r['gpu']}, torch {r['torch']}, triton {r['triton']}, {r['git_sha']}"
                      + (" (compiled reference)" if p == "ref_compiled" else ""))  # fmt: skip
        cell = [f"{v:.2f} ms" if v is not None else "" for v in t.values()]
        out.append(
            f"| {g} | {e} | {int(provs['flat']['n_edges']):,} | {cell[0]} | {cell[1]} | "
            f"{ratio(t['flat_fused'], t['anemoi_proj'])} | {cell[2]} | {cell[3]} | "
            f"{ratio(t['flat'], t['anemoi'])} | {cell[4]} | "
            f"{ratio(t['flat_fused'], t['ref_compiled'])} |"
        )
        f16 = fp16.get((g, e), {})
        if "flat" in f16:
            fp16_fused.append(ms(f16, "flat_fused") / ms(f16, "anemoi_proj"))
            fp16_mat.append(ms(f16, "flat") / ms(f16, "anemoi"))
    out.append("")
    line = "Forward + backward, bf16, median"
    if fp16_fused:
        line += (
            f"; fp16 in the same calls: fused / Anemoi + proj. {min(fp16_fused):.2f} to "
            f"{max(fp16_fused):.2f}, materialised / Anemoi {min(fp16_mat):.2f} to "
            f"{max(fp16_mat):.2f}"
        )
    out.append(line + "; measured on " + "; ".join(sorted(cards)) + ".")
    step = step_line(REPO / "profiling" / "results" / "step_breakdown.csv")
    return out + (["", step] if step else [])


def step_line(path: Path) -> str:
    """One sentence on the attention kernels inside the latest profiled triton step
    (``profile_step.py`` rows that name their kernel design)."""
    if not path.exists():
        return ""
    sys.path.insert(0, str(REPO / "profiling"))
    from _results import read_rows

    rows = [r for r in read_rows(path) if r.get("kernel_design") and r["backend"] == "triton"]
    if not rows:
        return ""
    last = [r for r in rows if (r["date"], r["git"]) == (rows[-1]["date"], rows[-1]["git"])]
    ms = {r["category"]: float(r["ms_per_step"]) for r in last}
    r = last[0]
    return (
        f"Inside the {r['graph']} training step ({r['channels']} channels, {r['layers']} layers, "
        f"bf16, checkpoint {r['checkpoint']}, compiled; `profile_step.py`, {r['gpu']}, "
        f"{r['git']}): attention kernels {ms['attention']:.1f} ms of {float(r['step_ms']):.1f} ms "
        f"per step, matrix products {ms['matmul']:.1f} ms, peak {float(r['peak_GiB']):.2f} GiB."
    )


def summary_lines(rows) -> list[str]:
    """Side-by-side table of the latest row of each (gpu, graph, edges, dtype, provider)."""
    latest = {}
    for r in rows:
        latest[(r["gpu"], r["graph"], r["edges_name"], r["n_edges"], r.get("dtype", "bf16"),
                r["provider"])] = r  # fmt: skip
    cases = dict.fromkeys(k[:5] for k in latest)
    if not cases:
        return []

    def ms(case, provider):
        r = latest.get((*case, provider))
        return float(r["median_ms"]) if r else None

    def fmt(v, spec=".3f"):
        return "" if v is None else format(v, spec)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    head = [
        "gpu", "graph", "edges", "E", "dtype", "triton", "flat", "anemoi", "best mat / anemoi",
        "triton_fused", "flat_fused", "anemoi_proj", "best fused / anemoi_proj", "ref_compiled",
        "floor mat", "floor fused",
    ]  # fmt: skip
    out = [
        "## Side by side (latest row of each; ms, forward + backward)",
        "",
        "Targets: best materialised <= 0.8x anemoi; best fused <= 0.5x anemoi_proj.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for case in cases:
        t = {p: ms(case, p) for p in PROVIDERS}
        mats = [v for v in (t["triton"], t["flat"]) if v is not None]
        fus = [v for v in (t["triton_fused"], t["flat_fused"]) if v is not None]
        floor_m = next((latest[(*case, p)]["floor_ms"] for p in ("triton", "flat", "anemoi",
                        "ref_compiled") if (*case, p) in latest), "")  # fmt: skip
        floor_f = next((latest[(*case, p)]["floor_ms"] for p in FUSED_PROVIDERS
                        if (*case, p) in latest), "")  # fmt: skip
        out.append("| " + " | ".join([
            case[0], case[1], case[2], case[3], case[4], fmt(t["triton"]), fmt(t["flat"]),
            fmt(t["anemoi"]), fmt(ratio(min(mats) if mats else None, t["anemoi"]), ".2f"),
            fmt(t["triton_fused"]), fmt(t["flat_fused"]), fmt(t["anemoi_proj"]),
            fmt(ratio(min(fus) if fus else None, t["anemoi_proj"]), ".2f"),
            fmt(t["ref_compiled"]), floor_m, floor_f,
        ]) + " |")  # fmt: skip
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", default=str(REPO / "profiling" / "results" / "attention_vs_anemoi.csv"))
    p.add_argument("--render", help="only regenerate the markdown table of this CSV")
    p.add_argument("--readme", help="print the README's attention table from this CSV")
    p.add_argument("--graphs", nargs="+", default=["o96_l6", "o320_l7"])
    p.add_argument("--roles", nargs="+", default=list(ROLES))
    p.add_argument("--providers", nargs="+", default=[p for p in PROVIDERS if p != "ref_eager"])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--compiled-dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                   help="dtypes the compiled reference runs in (each costs compiles)")  # fmt: skip
    p.add_argument("--compiled-graphs", nargs="+", default=list(GRAPHS),
                   help="graphs the compiled reference runs on")  # fmt: skip
    p.add_argument("--encoder-factor", type=float, default=1.2,
                   help="encoder cutoff as a factor of the mesh spacing (conf: 0.6)")  # fmt: skip
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--breakdown", action="store_true", help="also time triton fwd / bwd alone")
    p.add_argument("--show-configs", action="store_true", help="print the autotuner's choices")
    p.add_argument("--launches", action="store_true", help="count GPU kernels (torch.profiler)")
    p.add_argument("--precompile", action="store_true", help="fill triton's cache in parallel")
    p.add_argument("--once", action="store_true", help="run each provider once (for ncu)")
    p.add_argument("--warmup", type=int, default=25, help="ms")
    p.add_argument("--rep", type=int, default=150, help="ms")
    args = p.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    if args.readme:
        with Path(args.readme).open() as fh:
            print("\n".join(readme_lines(list(csv.DictReader(fh)))))
        return 0
    if args.once:  # one forward + backward per provider, no timing: a target for ncu
        device = "cuda" if torch.cuda.is_available() else "cpu"
        anemoi, _ = anemoi_gt()
        for gname in args.graphs:
            h, c = GRAPHS[gname]
            graphs = load_graphs(gname, args.encoder_factor)
            for role in args.roles:
                colptr, row, n_src, _ = graphs[role]
                gen = torch.Generator().manual_seed(0)
                for dname in args.dtypes:
                    index, x, g = make_case(colptr, row, n_src, h, c, DTYPES[dname], device, gen)
                    for provider in args.providers:
                        if provider.startswith("anemoi") and anemoi is None:
                            continue
                        provider_fn(provider, index, x, g, None, anemoi)[0]()
        return 0
    if not torch.cuda.is_available() and args.graphs != ["tiny"]:
        print("no GPU: only --graphs tiny runs (interpreter smoke test)", file=sys.stderr)
        return 1
    bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
