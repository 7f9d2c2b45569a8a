"""Scaling report of a sweep, built from its MLflow runs: table (markdown, CSV) and plots (PNG).

One row per point, in launch order: GPUs, nodes, layout, global batch, median s/step and its
spread, samples/s, speed-up and efficiency against the smallest successful point of the same
series, peak memory (largest rank), halo bytes per step, communication share, status and, for a
failed point, the reason. Points that differ only in ``parallel.gpus``/``parallel.nodes`` (or
``parallel.ensemble``: the same members spread over more ranks) form a series; a sweep over another key too (e.g. attention backends) has one series per value. Tags
``point.*`` of the point runs that differ between points and have no column of their own (a
node list, attempts, ...) become extra columns; those equal on every point are listed once under
the table.

``speed-up = (samples/s) / (samples/s of the base)``, ``ideal = GPUs / GPUs of the base``,
``efficiency = speed-up / ideal``: for strong scaling (fixed global batch) that is the step-time
ratio over the GPU ratio, for weak scaling (fixed batch per rank) the per-GPU throughput ratio.

Plots, on linear axes with every value written next to its mark:

* a sweep over GPU counts: ``throughput_efficiency.png`` (samples/s with the ideal line, and
  efficiency) and ``memory.png`` against GPUs, one line per series;
* a comparison at one GPU count (``kernel_compare``, ``partition_compare``): ``comparison.png``,
  one bar per series for samples/s, s/step and peak memory;
* points that partition the model (halo exchange): ``partition.png``, halo volume per step and
  edge / node imbalance (max / mean per rank) per partition method.

Attention backends: a point records the backend it asked for (``point.attention_backend``) and the
one that ran (``point.attention_backend_used``, with ``point.attention_fallback`` saying why they
differ, e.g. ``triton`` falls back to the torch reference on CPU). A point that fell back is
marked in the table and the plots (``triton -> torch (tensors are on cpu)``); when every point of
a backend comparison ran the same code, the report says in one warning line that the comparison
measures nothing, and tags the parent run ``squall.report_warning``. The table is still written:
the numbers are true measurements of what ran.

Prediction: where a series has a successful one-rank point, the scaling model
(:mod:`squall.planning.scaling`) is calibrated on its MLflow run (step time, model and graph of
its ``config.yaml``, links and rates of its ``cluster`` config) and predicts every other point's
s/step and peak memory per rank; the table adds them with their relative errors (the memory error
only where the points measured allocated GPU memory, not a CPU process's resident memory) and the
throughput plot draws the prediction dashed with open squares. Where no prediction can be made (no
one-rank point, a cluster config without ``links``, a graph that cannot be loaded) the report says
why in one line and is otherwise as measured.

A sweep with no measured point (nothing recorded yet, every point failed) gets its table with the
reasons and no plots.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from squall.errors import SquallError
from squall.scaling.state import (
    FAILURE_TAG,
    GPUS_TAG,
    INTERRUPT_TAG,
    JOB_TAG,
    OVERRIDES_TAG,
    SweepState,
    one_line,
)
from squall.tracking import metrics as M
from squall.tracking.logger import KIND_TAG, SWEEP_TAG

log = logging.getLogger(__name__)

#: Overrides that place a point in its series rather than define a new one.
SHAPE_KEYS = ("parallel.gpus", "parallel.nodes", "parallel.ensemble")
MAX_SEARCH = 10000  # runs per sweep read back; far above any sweep a person launches
BACKEND_TAG = "point.attention_backend"
BACKEND_USED_TAG = "point.attention_backend_used"
FALLBACK_TAG = "point.attention_fallback"
WARNING_TAG = "squall.report_warning"
#: ``point.*`` tags that have a column (or a place in the title) already, or say nothing a reader
#: of the table needs.
COVERED_TAGS = frozenset({
    GPUS_TAG, "point.nodes", "point.layout", BACKEND_TAG, BACKEND_USED_TAG, FALLBACK_TAG,
    "point.graph", "point.model", "point.nodelist",
})  # fmt: skip
#: Characters per line of a figure title: about the width of the 11 to 12 inch figures at 10 pt.
TITLE_WIDTH = 120


class ReportError(SquallError):
    """The sweep's runs cannot be found or read."""


@dataclass
class Row:
    """One point of the report; numbers are NaN where the point did not measure them."""

    job: int
    series: str
    gpus: int | None
    nodes: int | None
    layout: str
    global_batch: float
    step_s: float
    spread: float
    samples_per_s: float
    peak_memory_gib: float
    memory_kind: str
    device_memory_gb: float
    halo_bytes: float
    comm_share: float
    status: str
    reason: str
    run_id: str
    speedup: float = math.nan
    efficiency: float = math.nan
    edge_imbalance: float = math.nan
    node_imbalance: float = math.nan
    backend: str = ""
    backend_used: str = ""
    fallback: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    ran_on: str = ""  # Slurm node list (or hostname) of the point's last attempt
    model_parallel: int | None = None
    batch_per_group: int | None = None  # samples per model group and step
    shard: bool = False  # parameters sharded over the ranks (parallel.shard_parameters)
    # The scaling model's prediction of this point from the series' one-rank point
    predicted_s: float = math.nan
    predicted_gib: float = math.nan
    err_s: float = math.nan  # predicted / measured - 1
    err_gib: float = math.nan
    member_samples_per_s: float = math.nan  # an ensemble's samples/s x members
    members: int | None = None  # ensemble members per sample (1: deterministic)

    @property
    def ok(self) -> bool:
        """Whether the point finished and measured its steps."""
        return self.status == "FINISHED" and not math.isnan(self.samples_per_s)

    @property
    def fell_back(self) -> bool:
        """Whether the attention backend that ran is not the one asked for."""
        return bool(self.backend and self.backend_used and self.backend_used != self.backend)

    @property
    def attention(self) -> str:
        """The backend that ran: ``torch``, or ``triton -> torch (why)`` after a fallback."""
        if not self.fell_back:
            return self.backend_used or self.backend
        why = f" ({self.fallback})" if self.fallback else ""
        return f"{self.backend} -> {self.backend_used}{why}"


COLUMNS = [  # (header, attribute, format)
    ("#", "job", "{}"),
    ("series", "series", "{}"),
    ("GPUs", "gpus", "{}"),
    ("nodes", "nodes", "{}"),
    ("layout", "layout", "{}"),
    ("batch", "global_batch", "{:.0f}"),
    ("s/step", "step_s", "{:.4g}"),
    ("spread", "spread", "{:.2f}"),
    ("samples/s", "samples_per_s", "{:.4g}"),
    ("speed-up", "speedup", "{:.2f}"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("peak mem GiB", "peak_memory_gib", "{:.3g}"),
    ("halo B/step", "halo_bytes", "{:.3g}"),
    ("comm share", "comm_share", "{:.1%}"),
    ("status", "status", "{}"),
    ("reason", "reason", "{}"),
]
#: Columns shown only when some point has a value (where it ran, partitioned points, attention
#: backends).
OPTIONAL_COLUMNS = [
    ("member-samples/s", "member_samples_per_s", "{:.4g}"),
    ("ran on", "ran_on", "{}"),
    ("edge imbalance", "edge_imbalance", "{:.3f}"),
    ("node imbalance", "node_imbalance", "{:.3f}"),
    ("attention ran", "attention", "{}"),
    ("predicted s/step", "predicted_s", "{:.4g}"),
    ("s/step error", "err_s", "{:+.1%}"),
    ("predicted peak GiB", "predicted_gib", "{:.3g}"),
    ("peak error", "err_gib", "{:+.1%}"),
]


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


MEMORY_KINDS = {M.PEAK_ALLOCATED_GIB: "GPU memory allocated", M.PEAK_RSS_GIB: "resident memory"}


def _peak_memory(metrics: dict) -> tuple[float, str]:
    """Largest rank's peak and what it measures (GPU allocations, or RSS on CPU)."""
    for key, kind in MEMORY_KINDS.items():
        if key in metrics:
            return metrics[key], kind
    return math.nan, ""


def _overrides(text: str) -> dict[str, str]:
    """``key=value`` overrides of a point (tag ``squall.overrides``) as a mapping."""
    pairs = (o.split("=", 1) for o in text.split() if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs}


def _series_labels(all_overrides: list[dict[str, str]]) -> list[str]:
    """Label of each point's series: the swept keys other than the shape whose values differ
    between points (``-`` when only the shape was swept)."""
    keys = sorted({k for o in all_overrides for k in o} - set(SHAPE_KEYS))
    varying = [k for k in keys if len({o.get(k) for o in all_overrides}) > 1]
    return [" ".join(f"{k}={o[k]}" for k in varying if k in o) or "-" for o in all_overrides]


def _int_or_none(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _gpus_from(overrides: str) -> int | None:
    for o in overrides.split():
        if o.startswith("parallel.gpus="):
            return _int_or_none(o.split("=", 1)[1])
    return None


def collect_rows(state: SweepState) -> list[Row]:
    """Read the sweep's point runs from its store and compute speed-up and efficiency."""
    if state.tracking_uri is None:
        raise ReportError(f"sweep {state.sweep_id} was not tracked (tracking.enabled=false)")
    from mlflow.exceptions import MlflowException

    try:
        runs = state.client().search_runs(
            [state.experiment_id],
            filter_string=f"tags.{SWEEP_TAG} = '{state.sweep_id}' and tags.{KIND_TAG} = 'point'",
            max_results=MAX_SEARCH,
        )
    except MlflowException as err:
        raise ReportError(
            f"cannot read sweep {state.sweep_id} from {state.tracking_uri}: "
            f"{err.message.splitlines()[0]}"
        ) from err
    rows = []
    labels = _series_labels([_overrides(r.data.tags.get(OVERRIDES_TAG, "")) for r in runs])
    for run, series in zip(runs, labels, strict=True):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        overrides = tags.get(OVERRIDES_TAG, "")
        status = run.info.status
        reason = tags.get(FAILURE_TAG) or tags.get(INTERRUPT_TAG) or ""
        if status == "FINISHED":
            reason = ""
        row = Row(
            job=_int_or_none(tags.get(JOB_TAG)),
            series=series,
            gpus=_int_or_none(params.get("point.gpus", tags.get(GPUS_TAG)))
            or _gpus_from(overrides),
            nodes=_int_or_none(params.get("point.nodes")),
            layout=params.get("point.layout", "-"),
            global_batch=_float(params.get("point.global_batch")),
            step_s=metrics.get(M.STEP_S, math.nan),
            spread=metrics.get(M.STEP_SPREAD, math.nan),
            samples_per_s=metrics.get(M.SAMPLES_PER_S, math.nan),
            member_samples_per_s=metrics.get(M.MEMBER_SAMPLES_PER_S, math.nan),
            members=_int_or_none(params.get("point.members")),
            peak_memory_gib=_peak_memory(metrics)[0],
            memory_kind=_peak_memory(metrics)[1],
            device_memory_gb=_float(params.get("cluster.gpu_memory_gb")),
            halo_bytes=metrics.get(M.HALO_BYTES_PER_STEP, math.nan),
            comm_share=metrics.get(M.COMM_SHARE, math.nan),
            status=status,
            reason=" ".join(reason.split()),
            run_id=run.info.run_id,
            edge_imbalance=metrics.get(M.EDGE_IMBALANCE, math.nan),
            node_imbalance=metrics.get(M.NODE_IMBALANCE, math.nan),
            backend=tags.get(BACKEND_TAG, ""),
            backend_used=tags.get(BACKEND_USED_TAG, ""),
            fallback=" ".join(tags.get(FALLBACK_TAG, "").split()),
            ran_on=tags.get("point.nodelist", ""),
            model_parallel=_int_or_none(params.get("point.model_parallel")),
            batch_per_group=_int_or_none(params.get("point.batch_per_rank")),
            shard=str(params.get("parallel.shard_parameters", "")).lower() in ("true", "on", "1"),
            tags={
                k: " ".join(v.split())
                for k, v in tags.items()
                if k.startswith("point.") and k not in COVERED_TAGS
            },
        )
        if row.job is None:  # a run without a job number sorts first
            row.job = -1
        if row.fell_back:
            row.series = f"{series} -> {row.backend_used} ({row.fallback or 'fell back'})"
        rows.append(row)
    rows.sort(key=lambda r: r.job)
    for series in {r.series for r in rows}:
        done = [r for r in rows if r.series == series and r.ok and r.gpus]
        if not done:
            continue
        base = min(done, key=lambda r: (r.gpus, r.job))
        for r in done:
            r.speedup = r.samples_per_s / base.samples_per_s
            r.efficiency = r.speedup / (r.gpus / base.gpus)
    return rows


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the block; the earlier values come back after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _point_config(state: SweepState, run_id: str):
    """The resolved config a point ran (its ``config.yaml`` artifact)."""
    import tempfile

    from omegaconf import OmegaConf

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # no progress bar in the table
    with tempfile.TemporaryDirectory() as tmp, _environ(quiet):
        try:
            path = state.client().download_artifacts(run_id, "config.yaml", tmp)
        except Exception as err:  # noqa: BLE001 - any store failure is one reason
            raise ReportError(f"cannot read the config.yaml of run {run_id}: "
                              f"{one_line(err, 200)}") from err  # fmt: skip
        return OmegaConf.load(path)


def _act_bytes(cfg) -> int:
    """Bytes per activation value of the run: bf16 autocast (``training.precision`` bf16, or
    auto on a GPU) or fp32."""
    precision = str(cfg.training.get("precision", "auto"))
    if precision == "auto":
        return 2 if str(cfg.training.get("device", "cpu")).startswith("cuda") else 4
    return 2 if precision == "bf16" else 4


def _series_model(state: SweepState, base: Row, graphs: dict):
    """The scaling model calibrated on ``base`` (a one-rank point): its config's graph (through
    the graph cache of the run), model and cluster links, its MLflow run's step time."""
    from omegaconf import OmegaConf

    from squall.graphs import load_or_build
    from squall.planning.scaling import ClusterSpec, ScalingModel, calibrate, load_calibration

    cfg = _point_config(state, base.run_id)
    cluster = ClusterSpec.from_cfg(cfg.cluster)
    spec = OmegaConf.to_container(cfg.graph, resolve=True)
    key = repr(spec)
    if key not in graphs:
        try:
            graphs[key] = load_or_build(cfg.graph, Path(str(cfg.paths.cache)) / "graphs")
        except Exception as err:  # noqa: BLE001 - a graph that cannot be had is one reason
            raise ReportError(f"cannot load graph {cfg.graph.name}: {one_line(err, 300)}") from err
    graph = graphs[key]
    cal = load_calibration(f"mlflow:{base.run_id}@{state.tracking_uri}")
    rates = calibrate(cal, graph, cluster.hbm_Bps)
    return ScalingModel(graph, cal.mcfg, rates, cluster,
                        partition=str(cfg.parallel.get("partition") or "sfc"),
                        act_bytes=_act_bytes(cfg), rollout=int(cfg.training.get("rollout", 1)),
                        num_vars=cal.num_vars, input_steps=cal.input_steps)  # fmt: skip


def add_predictions(state: SweepState, rows: list[Row]) -> list[str]:
    """Fill ``predicted_s``, ``predicted_gib`` and their errors of every measured point from the
    scaling model (:mod:`squall.planning.scaling`) calibrated on the one-rank point of its
    series; return notes for the report (where it came from, or why there is none).

    Never raises: a prediction that cannot be made is a note, the rows stay as measured.
    """
    ok = [r for r in rows if r.ok and r.gpus]
    if not ok:
        return []
    series = sorted({r.series for r in ok})
    notes, graphs = [], {}
    allocated = MEMORY_KINDS[M.PEAK_ALLOCATED_GIB]
    for name in series:
        pts = [r for r in ok if r.series == name]
        label = f"series {name}: " if len(series) > 1 else ""
        ones = [r for r in pts if r.gpus == 1]
        if not ones:
            notes.append(f"No prediction{' for ' + label.rstrip(': ') if label else ''}: no "
                         "successful one-rank point to calibrate the scaling model on.")  # fmt: skip
            continue
        if any((r.members or 1) > 1 for r in pts):
            notes.append(f"No prediction{' for ' + label.rstrip(': ') if label else ''}: the "
                         "scaling model has no ensemble axis (parallel.ensemble).")  # fmt: skip
            continue
        base = min(ones, key=lambda r: r.job)
        others = [r for r in pts if r is not base]
        try:
            model = _series_model(state, base, graphs)
        except Exception as err:  # noqa: BLE001 - the measured report stands without it
            why = err.args[0] if isinstance(err, SquallError) and err.args else one_line(err)
            notes.append(f"No prediction{' for ' + label.rstrip(': ') if label else ''}: "
                         f"{' '.join(str(why).split())}")  # fmt: skip
            continue
        failed = []
        for r in others:
            try:
                mp = r.model_parallel or 1
                p = model.project(r.gpus, mp, r.batch_per_group or 1, r.shard and r.gpus > 1)
            except Exception as err:  # noqa: BLE001 - a layout the model cannot cut
                failed.append(f"#{r.job}: {one_line(err, 200)}")
                continue
            r.predicted_s, r.predicted_gib = p.step_s, p.peak_gib
            r.err_s = p.step_s / r.step_s - 1 if r.step_s > 0 else math.nan
            if r.memory_kind == allocated and r.peak_memory_gib > 0:
                r.err_gib = p.peak_gib / r.peak_memory_gib - 1
        c = model.cluster
        notes.append(
            f"{label}Predicted by the scaling model (squall.planning.scaling) calibrated on point "
            f"#{base.job} (1 rank, MLflow run {base.run_id}) with the links of "
            f"cluster {c.name} ({c.nvlink_Bps / 1e9:.3g} GB/s within a node, "
            f"{c.network_Bps / 1e9:.3g} GB/s between nodes, exchange latency "
            f"{c.exchange_latency_s * 1e6:.0f} us); error = predicted / measured - 1."
            + (" No prediction for " + "; ".join(failed) + "." if failed else "")
        )
        if any(r.memory_kind != allocated for r in others if r.memory_kind):
            notes.append(f"{label}Peak error not computed: these points measured resident memory "
                         "(CPU ranks), the model predicts allocated tensors.")  # fmt: skip
    return notes


def extra_tags(rows: list[Row]) -> tuple[list[str], dict[str, str]]:
    """``point.*`` tags without a column: those that differ between points (each a column, in
    name order) and those every point shares (name -> value)."""
    names = sorted({k for r in rows for k in r.tags})
    varying = [k for k in names if len({r.tags.get(k, "") for r in rows}) > 1]
    shared = {k: rows[0].tags[k] for k in names if k not in varying and k in rows[0].tags}
    return varying, shared


def _columns(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Columns of the table: the fixed ones (the series only when there are several; speed-up and
    efficiency only over several GPU counts), optional ones some point has a value for, then the
    varying ``point.*`` tags."""
    cols = [c for c in COLUMNS if c[1] != "series" or len({r.series for r in rows}) > 1]
    if len({r.gpus for r in rows if r.gpus}) <= 1:  # a comparison at one size: nothing scales
        cols = [c for c in cols if c[1] not in ("speedup", "efficiency")]
    at = [i for i, c in enumerate(cols) if c[1] == "status"][0]
    shown = []
    for col in OPTIONAL_COLUMNS:
        values = [getattr(r, col[1]) for r in rows]
        if col[1] == "attention":
            present = any(r.fell_back for r in rows) or len({r.backend for r in rows}) > 1
        else:
            present = any(v if isinstance(v, str) else not math.isnan(v) for v in values)
        if present:
            shown.append(col)
    varying, _ = extra_tags(rows)
    tag_cols = [(k.removeprefix("point."), f"tag:{k}", "{}") for k in varying]
    return cols[:at] + shown + tag_cols + cols[at:]


def _value(row: Row, attr: str):
    if attr.startswith("tag:"):
        return row.tags.get(attr[4:], "")
    return getattr(row, attr)


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table (the series column only when there are several)."""
    cols = _columns(rows)
    lines = [
        "| " + " | ".join(c[0] for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        cells = [_fmt(_value(r, attr), fmt).replace("|", "/") for _, attr, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """Every column, unformatted, plus the run id (a header only when there are no rows)."""
    cols = [c for c in COLUMNS] + [c for c in OPTIONAL_COLUMNS]
    varying, _ = extra_tags(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c[1] for c in cols] + [k for k in varying] + ["run_id"])
        for r in rows:
            values = [_value(r, c[1]) for c in cols] + [r.tags.get(k, "") for k in varying]
            writer.writerow(
                [
                    ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for v in values
                ]
                + [r.run_id]
            )


def kinds_of(rows: list[Row]) -> list[str]:
    """What the rows' memory numbers measure (GPU allocations, resident memory)."""
    return sorted({r.memory_kind for r in rows if r.memory_kind})


def warnings_of(rows: list[Row]) -> list[str]:
    """One line per thing a reader must know before trusting a comparison (fallen-back
    attention backends; a backend comparison in which every point ran the same code)."""
    out = []
    fell = [r for r in rows if r.fell_back]
    if fell:
        why = sorted({r.fallback for r in fell if r.fallback})
        pairs = sorted({f"{r.backend} -> {r.backend_used}" for r in fell})
        out.append(
            f"attention backend fell back on {len(fell)} of {len(rows)} point(s) "
            f"({', '.join(pairs)}{': ' + '; '.join(why) if why else ''})"
        )
    measured = [r for r in rows if r.ok and r.backend_used]
    asked = {r.backend for r in measured}
    ran = {r.backend_used for r in measured}
    if len(asked) > 1 and len(ran) == 1:
        out.append(
            f"every measured point ran the same attention code ({ran.pop()}): this "
            f"comparison of {', '.join(sorted(asked))} measures nothing; run it where "
            "each backend runs (triton: on GPUs)"
        )
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_labels(names: list[str]) -> tuple[dict[str, str], str]:
    """Plot labels of series: ``key=value ...`` shortened to the values when every series sets
    the same single key (returned as the axis name), wrapped before a fallback note."""
    keys = {n.split("=", 1)[0] for n in names if "=" in n}
    single = len(keys) == 1 and all(n.count("=") == 1 for n in names)
    key = keys.pop() if single else ""
    labels = {}
    for n in names:
        text = n.split("=", 1)[1] if single else n
        labels[n] = text.replace(" (", "\n(", 1) if " -> " in text else text
    return labels, key


def _annotate(ax, x, y, text: str, color="black", dy: int = 6, dx: int = 0) -> None:
    """Write ``text`` ``dy`` points above (below if negative) and ``dx`` right of a mark."""
    ax.annotate(
        text,
        (x, y),
        textcoords="offset points",
        xytext=(dx, dy),
        ha="center" if dx == 0 else "left",
        va="bottom" if dy >= 0 else "top",
        fontsize=8,
        color=color,
    )


def _gpu_axis(ax, gpus: list[int]) -> None:
    """GPUs on a linear axis, or a base-2 log axis when they span 8x or more (1 to 16 GPUs on a
    linear axis squeeze 1, 2 and 4 into one spot); ticks at the swept counts only."""
    if gpus and max(gpus) / min(gpus) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(gpus) / 1.4, max(gpus) * 1.4)
    elif gpus:
        pad = max(0.5, 0.08 * (max(gpus) - min(gpus)))
        ax.set_xlim(min(gpus) - pad, max(gpus) + pad)
    ax.set_xticks(gpus or [1], [str(g) for g in gpus or [1]])
    ax.minorticks_off()
    ax.set_xlabel("GPUs (ranks)")
    ax.grid(True, alpha=0.3)


def _failed_marks(ax, rows: list[Row]) -> None:
    """Failed points as red crosses on the x axis at their GPU counts."""
    lost = sorted({r.gpus for r in rows if not r.ok and r.gpus})
    if lost:
        ax.plot(
            lost,
            [0.0] * len(lost),
            "x",
            color="tab:red",
            markersize=9,
            mew=2,
            clip_on=False,
            label="failed (see table)",
            zorder=5,
        )


def _title(title: str, rows: list[Row], warnings: list[str]) -> str:
    failed = [r for r in rows if not r.ok]
    lines = title.split("\n")
    if failed:
        lines.append(f"{len(failed)} of {len(rows)} point(s) failed: see the table")
    lines += [f"warning: {w}" for w in warnings]
    return "\n".join(textwrap.fill(line, TITLE_WIDTH) for line in lines)


def _human_bytes(values: list[float]) -> tuple[float, str]:
    """Divisor and unit that put the largest of ``values`` between 1 and 1024."""
    top = max([v for v in values if not math.isnan(v)] + [0.0])
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if top >= div:
            return float(div), unit
    return 1.0, "B"


def _predicted_throughput(pts: list[Row]) -> list[tuple[int, float]]:
    """(GPUs, predicted samples/s) of a series' points that have a prediction, led by the
    one-rank point it was calibrated on (its measurement); empty without predictions."""
    have = [r for r in pts if not math.isnan(r.predicted_s) and r.predicted_s > 0]
    ones = [r for r in pts if r.gpus == 1]
    if not have or not ones:
        return []
    return [(1, min(ones, key=lambda r: r.job).samples_per_s)] + [(r.gpus, r.global_batch / r.predicted_s)
                                           for r in have]  # fmt: skip


def plot_scaling(rows: list[Row], out_dir: Path, title: str, warnings: list[str]) -> list[Path]:
    """``throughput_efficiency.png`` and ``memory.png`` against GPUs, one line per series."""
    plt = _pyplot()
    ok = [r for r in rows if r.ok and r.gpus]
    names = sorted({r.series for r in ok})
    labels, key = _short_labels(names)
    several = len(names) > 1
    all_gpus = sorted({r.gpus for r in rows if r.gpus})
    heading = _title(title, rows, warnings)
    paths = []

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.8))
    top = 0.0
    for name in names:
        pts = sorted((r for r in ok if r.series == name), key=lambda r: r.gpus)
        gpus = [r.gpus for r in pts]
        label = labels[name] if several else "measured"
        (line,) = ax_t.plot(gpus, [r.samples_per_s for r in pts], "o-", label=label, zorder=3)
        color = line.get_color()
        for r in pts:
            _annotate(ax_t, r.gpus, r.samples_per_s, f"{r.samples_per_s:.3g}", color, dy=-10, dx=8)
            _annotate(ax_e, r.gpus, 100 * r.efficiency, f"{100 * r.efficiency:.0f}%", color)
        base = pts[0]
        ideal = [base.samples_per_s * g / base.gpus for g in gpus]
        if len(pts) > 1:
            ax_t.plot(
                gpus,
                ideal,
                "--",
                color=color,
                alpha=0.6,
                linewidth=1.5,
                label=f"ideal{f' ({label})' if several else ''}: {base.samples_per_s:.3g} samples/s"
                f" x GPUs / {base.gpus}",
            )
            _annotate(ax_t, gpus[-1], ideal[-1], f"ideal {ideal[-1]:.3g}", color, dy=-14)
        ax_e.plot(gpus, [100 * r.efficiency for r in pts], "o-", color=color, label=label)
        predicted = _predicted_throughput(pts)
        if predicted:
            px, py = zip(*predicted, strict=True)
            ax_t.plot(px, py, "s--", color=color, mfc="none", linewidth=1.2, alpha=0.9,
                      label=f"predicted{f' ({label})' if several else ''} (scaling model, from "
                      f"{px[0]} GPU)")  # fmt: skip
            for x, y in predicted[1:]:
                _annotate(ax_t, x, y, f"pred {y:.3g}", color, dy=-4, dx=10)
            top = max(top, *py)
        top = max([top, *ideal, *(r.samples_per_s for r in pts)])
    ax_e.axhline(100, color="grey", linestyle="--", linewidth=1, label="ideal (100 %)")
    for ax in (ax_t, ax_e):
        _failed_marks(ax, rows)
        _gpu_axis(ax, all_gpus)
    ax_t.set_ylim(0, top * 1.2 if top > 0 else 1)
    ax_t.set_ylabel("throughput (samples/s)")
    pred = any(not math.isnan(r.predicted_s) for r in ok)
    ax_t.set_title("throughput (dashed: ideal, linear in GPUs"
                   + ("; open squares: scaling model's prediction)" if pred else ")"),
                   fontsize=10)  # fmt: skip
    ax_e.set_ylabel("parallel efficiency (%)")
    ax_e.set_ylim(0, max([120.0] + [100 * r.efficiency * 1.2 for r in ok]))
    ax_e.set_title("efficiency against the smallest point of each series", fontsize=10)
    for ax in (ax_t, ax_e):
        ax.legend(fontsize=8, title=key or None, title_fontsize=8, loc="lower right")
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "throughput_efficiency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    top = 0.0
    for name in names:
        pts = sorted(
            (r for r in ok if r.series == name and not math.isnan(r.peak_memory_gib)),
            key=lambda r: r.gpus,
        )
        if not pts:
            continue
        (line,) = ax.plot(
            [r.gpus for r in pts],
            [r.peak_memory_gib for r in pts],
            "o-",
            label=labels[name] if several else "largest rank",
        )
        for r in pts:
            _annotate(ax, r.gpus, r.peak_memory_gib, f"{r.peak_memory_gib:.3g}", line.get_color())
        top = max([top] + [r.peak_memory_gib for r in pts])
    _failed_marks(ax, rows)
    capacity = {r.device_memory_gb for r in ok if not math.isnan(r.device_memory_gb)}
    if len(capacity) == 1 and kinds_of(ok) == ["GPU memory allocated"]:
        # The card's memory in GB as sold (10^9 bytes) drawn on the GiB axis.
        gib = capacity.pop() * 1e9 / 2**30
        ax.axhline(
            gib, color="grey", linestyle="--", linewidth=1, label=f"GPU memory ({gib:.3g} GiB)"
        )
        top = max(top, gib)
    _gpu_axis(ax, all_gpus)
    ax.set_ylabel(f"peak {' / '.join(kinds_of(ok)) or 'memory'} per rank (GiB)")
    ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    ax.legend(fontsize=8, title=key or None, title_fontsize=8)
    ax.set_title(heading, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def _bars(
    ax, labels: list[str], values: list[float], fmt: str, hatched: list[bool], failed: list[bool]
) -> None:
    """One bar per label, its value written on top; hatched bars ran another backend than the
    one asked for; a failed label gets the word instead of a bar."""
    xs = range(len(labels))
    heights = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.bar(
        xs,
        heights,
        color=[("tab:red" if h else f"C{i}") for i, h in enumerate(hatched)],
        hatch=["//" if h else "" for h in hatched],
        alpha=0.8,
        edgecolor="black",
    )
    for x, bar, v, bad in zip(xs, bars, values, failed, strict=True):
        if bad:
            ax.text(x, 0, "failed", ha="center", va="bottom", color="tab:red", fontsize=9)
        elif not math.isnan(v):
            _annotate(ax, x, bar.get_height(), fmt.format(v), dy=2)
    ax.set_xticks(list(xs), labels, fontsize=8)
    top = max(heights + [0.0])
    ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    ax.grid(True, axis="y", alpha=0.3)


def _categories(rows: list[Row]) -> tuple[list[Row], list[str], str]:
    """One bar per point (launch order) with its series label (``@ N GPUs`` when several)."""
    labels, key = _short_labels(sorted({r.series for r in rows}))
    several_gpus = len({r.gpus for r in rows}) > 1
    names = [labels[r.series] + (f" @ {r.gpus} GPUs" if several_gpus else "") for r in rows]
    return rows, names, key


def plot_comparison(rows: list[Row], out_dir: Path, title: str, warnings: list[str]) -> list[Path]:
    """``comparison.png``: samples/s, s/step and peak memory, one bar per point."""
    plt = _pyplot()
    pts, names, key = _categories(rows)
    hatched = [r.fell_back for r in pts]
    failed = [not r.ok for r in pts]
    width = max(11.0, 1.3 * len(pts) * 3)
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.8))
    _bars(axes[0], names, [r.samples_per_s for r in pts], "{:.3g}", hatched, failed)
    axes[0].set_ylabel("throughput (samples/s)")
    _bars(axes[1], names, [r.step_s for r in pts], "{:.3g}", hatched, failed)
    axes[1].set_ylabel("median step time (s)")
    _bars(axes[2], names, [r.peak_memory_gib for r in pts], "{:.3g}", hatched, failed)
    axes[2].set_ylabel(f"peak {' / '.join(kinds_of(pts)) or 'memory'} per rank (GiB)")
    gpus = sorted({r.gpus for r in pts if r.gpus})
    for ax in axes:
        ax.set_xlabel(key or "series")
    on = f" at {gpus[0]} GPU(s)" if len(gpus) == 1 else ""
    if any(hatched):
        warnings = [*warnings, "hatched red bars ran another attention backend than asked for"]
    fig.suptitle(
        _title(title, rows, warnings) + f"\nhigher is better: throughput{on}; "
        "lower is better: step time, memory",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_partition(rows: list[Row], out_dir: Path, title: str, warnings: list[str]) -> list[Path]:
    """``partition.png``: halo volume per step and edge / node imbalance per partitioned point."""
    plt = _pyplot()
    pts, names, key = _categories(rows)
    failed = [not r.ok for r in pts]
    plain = [False] * len(pts)
    div, unit = _human_bytes([r.halo_bytes for r in pts])
    fig, (ax_h, ax_i) = plt.subplots(1, 2, figsize=(max(11.0, 2.6 * len(pts)), 4.8))
    _bars(ax_h, names, [r.halo_bytes / div for r in pts], "{:.3g}", plain, failed)
    ax_h.set_ylabel(f"halo volume per step, largest rank ({unit})")
    ax_h.set_title("halo exchange (forward + backward)", fontsize=10)
    xs = list(range(len(pts)))
    width = 0.38
    for offset, attr, label in (
        (-width / 2, "edge_imbalance", "edges"),
        (width / 2, "node_imbalance", "nodes"),
    ):
        values = [getattr(r, attr) for r in pts]
        bars = ax_i.bar(
            [x + offset for x in xs],
            [0 if math.isnan(v) else v for v in values],
            width,
            label=label,
            alpha=0.8,
            edgecolor="black",
        )
        for bar, v in zip(bars, values, strict=True):
            if not math.isnan(v):
                _annotate(ax_i, bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", dy=2)
    for x, bad in zip(xs, failed, strict=True):
        if bad:
            ax_i.text(x, 0, "failed", ha="center", va="bottom", color="tab:red", fontsize=9)
    ax_i.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="perfect balance (1.0)")
    ax_i.set_xticks(xs, names, fontsize=8)
    top = max(
        [1.0] + [v for r in pts for v in (r.edge_imbalance, r.node_imbalance) if not math.isnan(v)]
    )
    ax_i.set_ylim(0, top * 1.2)
    ax_i.set_ylabel("imbalance (max / mean per rank)")
    ax_i.set_title("load balance (lower is better, 1.0 is perfect)", fontsize=10)
    ax_i.grid(True, axis="y", alpha=0.3)
    ax_i.legend(fontsize=8, loc="lower right")
    for ax in (ax_h, ax_i):
        ax.set_xlabel(key or "partition")
    fig.suptitle(_title(title, rows, warnings), fontsize=10)
    fig.tight_layout()
    path = out_dir / "partition.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot(
    rows: list[Row], out_dir: Path, title: str, warnings: list[str] | None = None
) -> list[Path]:
    """The plots that fit the sweep (see the module docstring); none without a measured point."""
    warnings = warnings or []
    if not any(r.ok for r in rows):
        return []
    paths = []
    if len({r.gpus for r in rows if r.gpus}) > 1:
        paths += plot_scaling(rows, out_dir, title, warnings)
    else:
        paths += plot_comparison(rows, out_dir, title, warnings)
    partitioned = [
        r
        for r in rows
        if (r.ok and r.halo_bytes > 0)
        or not math.isnan(r.edge_imbalance)
        or not math.isnan(r.node_imbalance)
    ]
    if partitioned:
        paths += plot_partition(partitioned, out_dir, title, warnings)
    return paths


def report_sweep(
    state: SweepState,
    out_dir: str | Path | None = None,
    print_table: bool = True,
    finish_parent: bool = True,
) -> list[Row]:
    """Write the sweep's report, log it to the parent run, print the table.

    Parameters
    ----------
    state : SweepState
        The sweep (``sweep.json``).
    out_dir : str or Path, optional
        Where to write ``scaling.md``, ``scaling.csv`` and the PNGs; ``<sweep dir>/report`` by
        default.
    print_table : bool
        Print the markdown table and where the files are.
    finish_parent : bool
        End the parent run (FINISHED) once the report is logged.

    Returns
    -------
    list of Row
    """
    rows = collect_rows(state)
    try:
        predicted = add_predictions(state, rows)
    except Exception as err:  # noqa: BLE001 - the measured report never fails on the model
        predicted = [f"No prediction: {one_line(err)}"]
    out = Path(out_dir) if out_dir is not None else Path(state.sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # plots of an earlier report that this one may not draw
        stale.unlink()
    failed = [r for r in rows if not r.ok]
    title = f"{state.title}\nsweep {state.sweep_id}" if state.title else f"sweep {state.sweep_id}"
    warnings = warnings_of(rows)
    _, shared = extra_tags(rows)
    table = markdown_table(rows)
    notes = []
    if not rows:
        planned = len(state.points)
        notes.append(
            f"No point of this sweep recorded a run ({planned} planned in sweep.json): "
            "nothing was measured, so there are no plots."
        )
    elif len(failed) == len(rows):
        notes.append(
            f"All {len(rows)} point(s) failed; reasons in the table. Nothing was "
            "measured, so there are no plots."
        )
    elif failed:
        notes.append(f"{len(failed)} of {len(rows)} point(s) failed; reasons in the table.")
    notes += predicted
    notes += [f"Warning: {w}." for w in warnings]
    if shared:
        notes.append(
            "Same on every point: "
            + ", ".join(f"{k.removeprefix('point.')} {v}" for k, v in shared.items())
            + "."
        )
    text = "\n".join(notes) + ("\n" if notes else "")
    heading = title.replace("\n", ", ")
    (out / "scaling.md").write_text(
        f"# Scaling report: {heading}\n\n{table}\n{text}"
        f"\nRuns: {state.tracking_uri}, experiment "
        f"{state.experiment!r}, tag sweep_id={state.sweep_id}\n"
    )
    write_csv(rows, out / "scaling.csv")
    pngs = plot(rows, out, title, warnings)
    if state.parent_run_id is not None:
        client = state.client()
        for path in [out / "scaling.md", out / "scaling.csv", *pngs]:
            client.log_artifact(state.parent_run_id, str(path), "report")
        client.set_tag(state.parent_run_id, "squall.points_failed", str(len(failed)))
        client.set_tag(state.parent_run_id, "squall.points", str(len(rows)))
        if warnings:
            client.set_tag(state.parent_run_id, WARNING_TAG, "; ".join(warnings)[:2000])
        if finish_parent:
            client.set_terminated(state.parent_run_id, "FINISHED")
    if print_table:
        print(f"\nscaling table of sweep {state.sweep_id}:\n")
        print(table)
        if text:
            print(text)
        files = ", ".join(["scaling.md", "scaling.csv", *(p.name for p in pngs)])
        print(
            f"report: {out} ({files}); "
            f"runs: {state.tracking_uri} (parent run {state.parent_run_id})"
        )
    return rows
