"""Where a step's time and memory go, in files the usual tools open.

:func:`profile_steps` runs a step function under ``torch.profiler`` and writes, into one folder
per rank:

``trace.json``
    The profiler's Chrome-format trace (CPU ops, CUDA kernels, ``squall::*`` ranges); open it
    in Perfetto (https://ui.perfetto.dev) or ``chrome://tracing``.
``kernels.csv``
    One row per CUDA kernel (GPU) or per PyTorch operator's own CPU time (CPU), aggregated over
    the recorded steps: calls, total and mean time, share of the recorded time and, where the
    operator that launched it is known, achieved TFLOP/s (matrix products: the profiler's FLOP
    count) and GB/s (bytes of the operator's tensor inputs read once; its writes are not
    counted, so a lower bound), each also as a percentage of the rates measured on this device
    in the same process (:func:`measure_rates`).
``components.csv``
    Seconds per step of the ``encoder``, ``processor``, ``decoder``, ``optimiser`` and
    ``communication`` (and ``other``: embedding, head, loss, the rest), see
    :func:`component_times`.
``memory_snapshot.pickle``
    GPU only: the CUDA allocator's history over the recorded steps; open it at
    https://pytorch.org/memory_viz. Also written when the steps run out of memory, and the
    error names it.

Component ranges come from :func:`instrument`: ``squall::<role>`` around each block the model
runs (its ``run_block``, the one place single-device and sharded models run a block, so the
halo exchange of a sharded block is inside its range) and ``squall::optimiser`` around the
optimiser step. Backward work is attributed through the autograd sequence number that links each
backward function to the forward operator that created it (the forward operator's enclosing
range names its component). Communication (NCCL kernels, gloo and c10d collectives) is counted
under ``communication`` and taken out of the component it ran in.
"""

from __future__ import annotations

import csv
import logging
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from squall.errors import SquallError

log = logging.getLogger(__name__)

RANGE_PREFIX = "squall::"
STEP_RANGE = "squall::step"
EVALUATE = "autograd::engine::evaluate_function"  # one backward function, as the profiler names it
COMPONENTS = ("encoder", "processor", "decoder", "optimiser", "communication", "other")
#: Names of communication: NCCL kernels and ops, gloo ops, c10d collectives and their records.
COMM = re.compile(r"nccl|gloo|c10d::|record_param_comms", re.I)

#: Bytes per element of the dtype names the profiler records for operator inputs.
ITEMSIZE = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8,
            "int": 4, "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1,
            "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}  # fmt: skip


class ProfileOOM(SquallError):
    """The profiled steps ran out of GPU memory (the message names the memory snapshot)."""


def out_of_memory_error(err: BaseException, device: torch.device, snapshot: Path, where: str,
                        advice: str = "") -> ProfileOOM:  # fmt: skip
    """The one-line error for a CUDA out-of-memory ``err``, after writing a memory snapshot to
    ``snapshot`` (the allocator's segments, and its history when it was being recorded)."""
    try:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(snapshot))
        hint = f"; memory snapshot {snapshot} (open it at https://pytorch.org/memory_viz)"
    except Exception as dump_err:  # noqa: BLE001 - the out-of-memory error is what to report
        hint = f"; no memory snapshot ({type(dump_err).__name__}: {dump_err})"
    first = (str(err).splitlines() or [""])[0]
    return ProfileOOM(f"out of memory during {where} on {device} ({first}){hint}{advice}")


# ----------------------------------------------------------------------------------------------
# ranges


def instrument(model, optimizer=None) -> Callable[[], None]:
    """Add ``squall::<role>`` ranges around the model's blocks and ``squall::optimiser`` around
    ``optimizer.step``; returns a function that removes them.

    ``model`` is a :class:`~squall.models.forecaster.GraphForecaster` (sharded or not): the
    one call that runs a block, ``model.runner(graph, role, ...)`` (or, in models without a
    block runner, the method ``run_block(role, ...)``), is wrapped on the instance.
    """
    if hasattr(model, "runner"):
        runner = model.runner

        def ranged_runner(graph, role, *args, **kwargs):
            with record_function(RANGE_PREFIX + role):
                return runner(graph, role, *args, **kwargs)

        model.runner = ranged_runner

        def restore_model() -> None:
            model.runner = runner
    else:
        run_block = model.run_block

        def ranged_run_block(role, *args, **kwargs):
            with record_function(RANGE_PREFIX + role):
                return run_block(role, *args, **kwargs)

        model.run_block = ranged_run_block

        def restore_model() -> None:
            del model.run_block  # back to the class's method

    handles = []
    if optimizer is not None:
        ranges: list = []

        def pre(*_):
            ranges.append(torch.ops.profiler._record_function_enter_new(RANGE_PREFIX + "optimiser"))

        def post(*_):
            torch.ops.profiler._record_function_exit(ranges.pop())

        handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def remove() -> None:
        restore_model()
        for h in handles:
            h.remove()

    return remove


# ----------------------------------------------------------------------------------------------
# device rates


def measure_rates(device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Matrix-product TFLOP/s (in ``dtype``: bf16 on a GPU, fp32 on a CPU by default) and copy
    GB/s (read + write) on ``device``, measured now: the ceilings the kernel table compares to.

    Sizes: 4096^2 bf16 products run near the H100/H200 peak within 10 repeats; a 256 MiB copy is
    far beyond any cache. On a CPU, 1024^2 and 64 MiB keep the measurement under a second.
    """
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n, copy_bytes, reps = (4096, 256 * 2**20, 10) if cuda else (1024, 64 * 2**20, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        fn()  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / reps

    mm_s = timed(lambda: a @ b)
    copy_s = timed(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * n**3 / mm_s / 1e12, "copy_GBps": 2 * copy_bytes / copy_s / 1e9,
            "matmul_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# tables from the profiler's events


def _input_bytes(event) -> int | None:
    shapes, dtypes = event.input_shapes or [], getattr(event, "input_dtypes", None) or []
    total, known = 0, False
    for shape, dtype in zip(shapes, dtypes, strict=False):
        if not isinstance(shape, list) or not shape or dtype not in ITEMSIZE:
            continue
        count = 1
        for d in shape:
            count *= int(d)
        total += count * ITEMSIZE[dtype]
        known = True
    return total if known else None


def kernel_table(events, cuda: bool, rates: dict, seconds: float) -> list[dict]:
    """Rows of ``kernels.csv`` (see the module docstring), longest total time first.

    Parameters
    ----------
    events : list of FunctionEvent
        ``prof.events()``.
    cuda : bool
        Rows are CUDA kernels (else operators' own CPU time).
    rates : dict
        From :func:`measure_rates`.
    seconds : float
        Recorded time the shares are of.
    """
    events = _host_events(events)
    acc: dict[str, dict] = defaultdict(lambda: {"calls": 0, "s": 0.0, "flop": 0.0, "flop_s": 0.0,
                                                "bytes": 0.0, "bytes_s": 0.0})  # fmt: skip
    for e in events:
        if e.is_user_annotation or e.name.startswith(("squall::", "ProfilerStep")):
            continue
        flops = float(e.flops or 0)
        nbytes = _input_bytes(e)
        if cuda:
            kernels = list(e.kernels)
            for k in kernels:
                row = acc[k.name]
                row["calls"] += 1
                row["s"] += k.duration / 1e6
                if len(kernels) == 1:  # the operator's work is this kernel's
                    if flops:
                        row["flop"] += flops
                        row["flop_s"] += k.duration / 1e6
                    if nbytes:
                        row["bytes"] += nbytes
                        row["bytes_s"] += k.duration / 1e6
        else:
            own = e.self_cpu_time_total / 1e6
            if own <= 0:
                continue
            row = acc[e.name]
            row["calls"] += 1
            row["s"] += own
            # the operator's FLOPs and bytes belong to its own time only when it did most of
            # its work itself (not a composite like aten::linear, whose children do it)
            if own >= 0.5 * e.cpu_time_total / 1e6:
                if flops:
                    row["flop"] += flops
                    row["flop_s"] += own
                if nbytes:
                    row["bytes"] += nbytes
                    row["bytes_s"] += own
    rows = []
    for name, r in sorted(acc.items(), key=lambda kv: -kv[1]["s"]):
        tflops = r["flop"] / r["flop_s"] / 1e12 if r["flop_s"] > 0 else None
        gbps = r["bytes"] / r["bytes_s"] / 1e9 if r["bytes_s"] > 0 else None
        rows.append({
            "name": name, "calls": r["calls"], "total_ms": round(r["s"] * 1e3, 4),
            "mean_us": round(r["s"] / r["calls"] * 1e6, 2),
            "share_pct": round(100 * r["s"] / seconds, 2) if seconds > 0 else None,
            "tflops": _sig(tflops),
            "pct_of_matmul_peak": _sig(tflops and 100 * tflops / rates["matmul_tflops"]),
            "input_GBps": _sig(gbps),
            "pct_of_copy_rate": _sig(gbps and 100 * gbps / rates["copy_GBps"]),
        })  # fmt: skip
    return rows


def _host_events(events) -> list:
    """The host-side events (operators, ranges): the profiler also lists each range's GPU-side
    copy and each kernel as events of their own, which are reached through ``kernels``."""
    return [e for e in events if e.device_type == DeviceType.CPU]


def _sig(value: float | None) -> float | None:
    """Four significant figures (rates span from 1e-4 on a busy CPU to 1e3 on a GPU)."""
    return None if value is None else float(f"{value:.4g}")


def _event_time(e, cuda: bool) -> float:
    """Seconds of an event: device time of everything it launched (GPU) or its CPU time."""
    return (e.device_time_total if cuda else e.cpu_time_total) / 1e6


def _range_of(e) -> str | None:
    """The innermost ``squall::<component>`` range enclosing ``e`` (``None``: none)."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(RANGE_PREFIX) and p.name != STEP_RANGE:
            return p.name[len(RANGE_PREFIX) :]
        p = p.cpu_parent
    return None


def component_times(events, cuda: bool, steps: int) -> dict[str, float]:
    """Seconds per step of each of :data:`COMPONENTS` (see the module docstring).

    Forward: the ``squall::<component>`` ranges' time. Backward: each
    ``autograd::engine::evaluate_function`` event goes to the component of the forward operator
    with its sequence number. Communication events (:data:`COMM`) go to ``communication`` and
    out of the component around them. ``other`` is the recorded steps' time left over.

    On a CPU, gloo runs a collective on threads of its own while the calling thread waits inside
    a component's range, and both threads record it: communication is then the time at least
    one thread was in a collective (the union of their intervals), and each component loses the
    part of that union inside its range, so no second is counted twice.
    """
    events = _host_events(events)
    out = dict.fromkeys(COMPONENTS, 0.0)
    seq_component: dict[int, str] = {}
    step_total = 0.0
    busy = None if cuda else _comm_union(events)
    for e in events:
        if e.name == STEP_RANGE:
            step_total += (e.time_range.end - e.time_range.start) / 1e6
        elif e.name.startswith(RANGE_PREFIX):
            comp = e.name[len(RANGE_PREFIX) :]
            if _range_of(e) is None:  # outermost range of its kind: nested ones counted in it
                seconds = _event_time(e, cuda) if cuda else _wall_without(e, busy)
                out[comp if comp in out else "other"] += seconds
        elif e.sequence_nr >= 0 and not e.name.startswith(EVALUATE):
            comp = _range_of(e)
            if comp is not None:
                seq_component.setdefault(e.sequence_nr, comp)
    for e in events:
        name = e.name
        if name.startswith(EVALUATE):
            comp = seq_component.get(e.sequence_nr)
            outermost = not any(p.name.startswith(EVALUATE) for p in _ancestors(e))
            if comp is not None and outermost and _range_of(e) is None:
                out[comp] += _event_time(e, cuda) if cuda else _wall_without(e, busy)
        elif cuda and COMM.search(name) and not any(COMM.search(c.name) for c in _ancestors(e)):
            seconds = _event_time(e, cuda)
            out["communication"] += seconds
            owner = _range_of(e) or _backward_owner(e, seq_component)
            if owner in out and owner != "communication":
                out[owner] = max(0.0, out[owner] - seconds)
    if not cuda:  # the union's part inside the recorded steps
        spans = [(e.time_range.start, e.time_range.end) for e in events if e.name == STEP_RANGE]
        out["communication"] = sum(max(0.0, min(b, s1) - max(a, s0))
                                   for a, b in busy for s0, s1 in spans) / 1e6  # fmt: skip
    # the rest of the steps: wall time on a CPU, every kernel's time on a GPU (backward kernels
    # are launched from autograd's device thread, outside the step's range)
    total = kernel_seconds(events) if cuda else step_total
    out["other"] = max(0.0, total - sum(v for k, v in out.items() if k != "other"))
    return {k: v / steps for k, v in out.items()}


def _comm_union(events) -> list[tuple[float, float]]:
    """Disjoint, sorted ``(start, end)`` microseconds during which any thread was inside an
    outermost communication event."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if COMM.search(e.name) and not any(COMM.search(c.name) for c in _ancestors(e)))  # fmt: skip
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _wall_without(e, busy: list[tuple[float, float]]) -> float:
    """Seconds of ``e``'s wall time outside the intervals ``busy``."""
    start, end = e.time_range.start, e.time_range.end
    inside = sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy if a < end and b > start)
    return (end - start - inside) / 1e6


def kernel_seconds(events) -> float:
    """Summed duration of every CUDA kernel the events launched."""
    return sum(k.duration for e in events for k in e.kernels) / 1e6


def _ancestors(e):
    p = e.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _backward_owner(e, seq_component: dict[int, str]) -> str | None:
    for p in _ancestors(e):
        if p.name.startswith(EVALUATE):
            return seq_component.get(p.sequence_nr)
    return None


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# the profiled run


def profile_steps(step: Callable[[], object], out: Path, device: torch.device, warmup: int,
                  steps: int, memory_snapshot: bool = True,
                  history_entries: int = 100000) -> dict:  # fmt: skip
    """Run ``step`` ``warmup`` times, then ``steps`` times under the profiler; write the files of
    the module docstring into ``out``.

    Returns
    -------
    dict
        ``files`` (name -> path), ``step_s`` (median wall time of a recorded step),
        ``components`` (seconds per step), ``rates`` (:func:`measure_rates`), ``kernels``
        (the table's rows).

    Raises
    ------
    ProfileOOM
        The steps ran out of GPU memory; a snapshot was written first and is named.
    """
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    files: dict[str, Path] = {}
    snapshot = out / "memory_snapshot.pickle"
    record_memory = cuda and memory_snapshot
    if not cuda:
        log.info("CUDA memory snapshot: not written (no CUDA device; profiling on %s)", device)
    elif not memory_snapshot:
        log.info("CUDA memory snapshot: off (profile.memory_snapshot=false)")
    rates = measure_rates(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def oom(err: BaseException, where: str) -> ProfileOOM:
        return out_of_memory_error(err, device, snapshot, where)

    try:
        for _ in range(warmup):
            step()
        sync()
    except torch.cuda.OutOfMemoryError as err:
        raise oom(err, "the warm-up steps") from None
    if record_memory:
        torch.cuda.memory._record_memory_history(max_entries=history_entries)
        torch.cuda.reset_peak_memory_stats(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    times = []
    try:
        with profile(activities=activities, record_shapes=True, with_flops=True) as prof:
            for _ in range(steps):
                began = time.perf_counter()
                with record_function(STEP_RANGE):
                    step()
                    sync()  # the range then spans the step's device work too
                times.append(time.perf_counter() - began)
    except torch.cuda.OutOfMemoryError as err:
        raise oom(err, "the profiled steps") from None
    finally:
        if record_memory:
            try:
                torch.cuda.memory._dump_snapshot(str(snapshot))
                files["memory_snapshot"] = snapshot
            finally:
                torch.cuda.memory._record_memory_history(enabled=None)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    files["trace"] = trace
    events = prof.events()
    recorded = kernel_seconds(_host_events(events)) if cuda else sum(times)
    kernels = kernel_table(events, cuda, rates, recorded)
    files["kernels"] = write_csv(out / "kernels.csv", kernels)
    components = component_times(events, cuda, steps)
    step_s = statistics.median(times)
    rows = [{"component": k, "s_per_step": round(v, 6),
             "share_pct": round(100 * v / step_s, 2) if step_s > 0 else None}
            for k, v in components.items()]  # fmt: skip
    files["components"] = write_csv(out / "components.csv", rows)
    result = {"files": files, "step_s": step_s, "components": components, "rates": rates,
              "kernels": kernels}  # fmt: skip
    if cuda:
        result["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# ----------------------------------------------------------------------------------------------
# jobs.profile


def profile_job(cfg) -> dict:
    """Profile ``cfg.profile.mode`` steps of the configured model on this rank; rank 0 logs every
    rank's files as artifacts of one MLflow run. Call on every rank of the process group."""
    import torch.distributed as dist

    from squall.data.setup import build_dataset
    from squall.tracking import NullLogger
    from squall.train.forecast import ModelStep, Rollout, autocast_dtype
    from squall.train.runner import build_run

    p = cfg.profile
    mode = str(p.mode)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    parts = build_run(cfg, NullLogger(), training=mode == "train", distribute=True)
    model, trainer, device = parts.model, parts.trainer, parts.trainer.device
    if mode == "train":
        batch_size = int(cfg.training.batch_size)
        if len(parts.train_set) < batch_size:
            raise SquallError(f"training split has {len(parts.train_set)} windows, fewer than "
                              f"training.batch_size={batch_size}")  # fmt: skip
        batch = torch.utils.data.default_collate([parts.train_set[i] for i in range(batch_size)])
        remove = instrument(model, trainer.optimizer)

        def step():
            trainer.train_step(batch)
    else:
        model.eval()
        f = cfg.forecast
        data = build_dataset(cfg, "validation", rollout=1, normaliser=parts.train_set.normaliser)
        sample = data[0]
        x, y = sample["x"][None], sample["y"][None]
        area = torch.from_numpy(parts.graph.nodes["data"].area.astype("float32")).to(device)
        model_step = ModelStep(model, device, autocast_dtype(str(f.precision), device),
                               bool(f.cuda_graphs))  # fmt: skip
        roll = Rollout(model, parts.layout, area, parts.parallel.grid_indices, model_step)
        remove = instrument(model)

        def step():
            roll.run(x, y)

    out = Path(str(p.output)) / f"rank{rank}"
    try:
        result = profile_steps(step, out, device, int(p.warmup_steps), int(p.steps),
                               bool(p.memory_snapshot), int(p.memory_history_entries))  # fmt: skip
    finally:
        remove()
    result.update(mode=mode, rank=rank, world=world, folder=str(out))
    if world > 1:
        summaries = [None] * world
        dist.all_gather_object(summaries, {k: result.get(k) for k in
                                           ("rank", "folder", "step_s", "components",
                                            "peak_allocated_GiB")})  # fmt: skip
    else:
        summaries = [{k: result.get(k) for k in ("rank", "folder", "step_s", "components",
                                                  "peak_allocated_GiB")}]  # fmt: skip
    result["ranks"] = summaries
    if rank == 0:
        _record(cfg, result, parts)
    return result


def _record(cfg, result: dict, parts) -> None:
    """One MLflow run: the step time and per-component times of rank 0 (and every rank's under
    ``/rank<N>``), peak memory, and every rank's files as artifacts ``profile/rank<N>/``."""
    from squall.config import to_container
    from squall.tracking import create_logger
    from squall.tracking import metrics as M
    from squall.tracking.experiment import layout_name, run_name

    layout = parts.parallel.groups.layout
    name = run_name("profile", str(cfg.graph.name), str(cfg.model.name),
                    layout_name(layout.model_parallel, layout.data_parallel))  # fmt: skip
    tags = {"job": "profile", "squall.profile_mode": result["mode"]}
    with create_logger(to_container(cfg.tracking) or {}, store_dir=Path(str(cfg.paths.cache))
                       / "mlflow", run_name=name, tags=tags) as logger:  # fmt: skip
        if logger.run_id is None:  # tracking.enabled=false
            return
        logger.log_params({"profile": to_container(cfg.profile), "graph.name": cfg.graph.name,
                           "model": to_container(cfg.model),
                           "parallel": to_container(cfg.parallel)})  # fmt: skip
        metrics = {M.PROFILE_STEP_S: result["step_s"]}
        metrics.update({M.profile_component_s(k): v for k, v in result["components"].items()})
        for summary in result["ranks"]:
            r = summary["rank"]
            metrics[M.per_rank(M.PROFILE_STEP_S, r)] = summary["step_s"]
            if summary.get("peak_allocated_GiB") is not None:
                metrics[M.per_rank(M.PEAK_ALLOCATED_GIB, r)] = summary["peak_allocated_GiB"]
        logger.log_metrics(metrics, step=0)
        for summary in result["ranks"]:
            folder = Path(summary["folder"])
            for path in sorted(folder.iterdir()):
                logger.log_artifact(path, f"profile/rank{summary['rank']}")
        result["mlflow_run_id"], result["tracking_uri"] = logger.run_id, logger.tracking_uri
