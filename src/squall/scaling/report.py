"""Scaling report of a sweep, built from its MLflow runs: table (markdown, CSV) and plots (PNG).

One row per point, in launch order: GPUs, nodes, layout, global batch, median s/step and its
spread, samples/s, speed-up and efficiency against the smallest successful point of the same
series, peak memory (largest rank), halo bytes per step, communication share, status and, for a
failed point, the reason. Points that differ only in ``parallel.gpus``/``parallel.nodes`` form a
series; a sweep over another key too (e.g. attention backends) has one series per value.

``speed-up = (samples/s) / (samples/s of the base)``, ``ideal = GPUs / GPUs of the base``,
``efficiency = speed-up / ideal``: for strong scaling (fixed global batch) that is the step-time
ratio over the GPU ratio, for weak scaling (fixed batch per rank) the per-GPU throughput ratio.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from squall.errors import SquallError
from squall.scaling.sweep import (
    FAILURE_TAG,
    GPUS_TAG,
    INTERRUPT_TAG,
    JOB_TAG,
    OVERRIDES_TAG,
    SweepState,
)
from squall.tracking import metrics as M
from squall.tracking.logger import KIND_TAG, SWEEP_TAG

log = logging.getLogger(__name__)

#: Overrides that place a point in its series rather than define a new one.
SHAPE_KEYS = ("parallel.gpus", "parallel.nodes")
MAX_SEARCH = 10000  # runs per sweep read back; far above any sweep a person launches


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

    @property
    def ok(self) -> bool:
        """Whether the point finished and measured its steps."""
        return self.status == "FINISHED" and not math.isnan(self.samples_per_s)


COLUMNS = [  # (header, attribute, format)
    ("#", "job", "{}"), ("series", "series", "{}"), ("GPUs", "gpus", "{}"),
    ("nodes", "nodes", "{}"), ("layout", "layout", "{}"), ("batch", "global_batch", "{:.0f}"),
    ("s/step", "step_s", "{:.4g}"), ("spread", "spread", "{:.2f}"),
    ("samples/s", "samples_per_s", "{:.4g}"), ("speed-up", "speedup", "{:.2f}"),
    ("efficiency", "efficiency", "{:.0%}"), ("peak mem GiB", "peak_memory_gib", "{:.3g}"),
    ("halo B/step", "halo_bytes", "{:.3g}"), ("comm share", "comm_share", "{:.1%}"),
    ("status", "status", "{}"), ("reason", "reason", "{}"),
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
            max_results=MAX_SEARCH)
    except MlflowException as err:
        raise ReportError(f"cannot read sweep {state.sweep_id} from {state.tracking_uri}: "
                          f"{err.message.splitlines()[0]}") from err
    rows = []
    labels = _series_labels([_overrides(r.data.tags.get(OVERRIDES_TAG, "")) for r in runs])
    for run, series in zip(runs, labels, strict=True):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        overrides = tags.get(OVERRIDES_TAG, "")
        status = run.info.status
        reason = tags.get(FAILURE_TAG) or tags.get(INTERRUPT_TAG) or ""
        if status == "FINISHED":
            reason = ""
        rows.append(Row(
            job=int(tags.get(JOB_TAG, -1)), series=series,
            gpus=_int_or_none(params.get("point.gpus", tags.get(GPUS_TAG))) or _gpus_from(overrides),
            nodes=_int_or_none(params.get("point.nodes")),
            layout=params.get("point.layout", "-"),
            global_batch=float(params.get("point.global_batch", "nan")),
            step_s=metrics.get(M.STEP_S, math.nan), spread=metrics.get(M.STEP_SPREAD, math.nan),
            samples_per_s=metrics.get(M.SAMPLES_PER_S, math.nan),
            peak_memory_gib=_peak_memory(metrics)[0], memory_kind=_peak_memory(metrics)[1],
            device_memory_gb=_float(params.get("cluster.gpu_memory_gb")),
            halo_bytes=metrics.get(M.HALO_BYTES_PER_STEP, math.nan),
            comm_share=metrics.get(M.COMM_SHARE, math.nan),
            status=status, reason=" ".join(reason.split()), run_id=run.info.run_id))
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


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table (the series column only when there are several)."""
    cols = [c for c in COLUMNS if c[1] != "series" or len({r.series for r in rows}) > 1]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = [_fmt(getattr(r, attr), fmt).replace("|", "/") for _, attr, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """Every column, unformatted, plus the run id."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c[1] for c in COLUMNS] + ["run_id"])
        for r in rows:
            writer.writerow([("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for v in (getattr(r, c[1]) for c in COLUMNS)] + [r.run_id])


def kinds_of(rows: list[Row]) -> list[str]:
    """What the rows' memory numbers measure (GPU allocations, resident memory)."""
    return sorted({r.memory_kind for r in rows if r.memory_kind})


def plot(rows: list[Row], out_dir: Path, title: str) -> list[Path]:
    """``throughput_efficiency.png`` and ``memory.png`` against GPUs, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ok = [r for r in rows if r.ok and r.gpus]
    failed = [r for r in rows if not r.ok]
    series = sorted({r.series for r in ok})
    note = f"{len(failed)} failed point(s): see the table" if failed else None
    paths = []

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in series:
        pts = sorted((r for r in ok if r.series == name), key=lambda r: r.gpus)
        gpus = [r.gpus for r in pts]
        label = name if len(series) > 1 else "measured"
        line, = ax_t.plot(gpus, [r.samples_per_s for r in pts], "o-", label=label)
        base = pts[0]
        ax_t.plot(gpus, [base.samples_per_s * g / base.gpus for g in gpus], "--",
                  color=line.get_color(), alpha=0.5,
                  label=f"ideal ({label})" if len(series) > 1 else "ideal")
        ax_e.plot(gpus, [100 * r.efficiency for r in pts], "o-", color=line.get_color(),
                  label=label)
    ax_e.axhline(100, color="grey", linestyle="--", linewidth=1, label="ideal")
    all_gpus = sorted({r.gpus for r in rows if r.gpus})
    lost = sorted({r.gpus for r in failed if r.gpus})
    for ax in (ax_t, ax_e):
        if lost:  # failed points as red crosses on the axis, at their GPU counts
            ax.plot(lost, [0.03] * len(lost), "x", color="tab:red", markersize=9, mew=2,
                    transform=ax.get_xaxis_transform(), clip_on=False, label="failed")
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_gpus or [1], [str(g) for g in all_gpus or [1]])
        ax.set_xlabel("GPUs (ranks)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax_t.yaxis.set_major_formatter(plain)
    ax_t.yaxis.set_minor_formatter(plain)
    ax_t.set_ylabel("throughput (samples/s)")
    ax_t.set_title("throughput")
    ax_e.set_ylabel("parallel efficiency (%)")
    ax_e.set_ylim(0, max([110.0] + [100 * r.efficiency * 1.1 for r in ok]))
    ax_e.set_title("efficiency against the smallest point")
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "throughput_efficiency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name in series:
        pts = sorted((r for r in ok if r.series == name), key=lambda r: r.gpus)
        ax.plot([r.gpus for r in pts], [r.peak_memory_gib for r in pts], "o-",
                label=name if len(series) > 1 else "largest rank")
    if lost:
        ax.plot(lost, [0.03] * len(lost), "x", color="tab:red", markersize=9, mew=2,
                transform=ax.get_xaxis_transform(), clip_on=False, label="failed")
    capacity = {r.device_memory_gb for r in ok if not math.isnan(r.device_memory_gb)}
    if len(capacity) == 1 and kinds_of(ok) == ["GPU memory allocated"]:
        # The card's memory in GB as sold (10^9 bytes) drawn on the GiB axis.
        gib = capacity.pop() * 1e9 / 2**30
        ax.axhline(gib, color="grey", linestyle="--", linewidth=1, label=f"GPU memory ({gib:.3g} GiB)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_gpus or [1], [str(g) for g in all_gpus or [1]])
    ax.set_xlabel("GPUs (ranks)")
    ax.set_ylabel(f"peak {' / '.join(kinds_of(ok)) or 'memory'} per rank (GiB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "memory.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def report_sweep(state: SweepState, out_dir: str | Path | None = None,
                 print_table: bool = True, finish_parent: bool = True) -> list[Row]:
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
    out = Path(out_dir) if out_dir is not None else Path(state.sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    failed = [r for r in rows if not r.ok]
    title = f"{state.title}\nsweep {state.sweep_id}" if state.title else f"sweep {state.sweep_id}"
    table = markdown_table(rows)
    failed_line = (f"{len(failed)} of {len(rows)} point(s) failed; reasons in the table.\n"
                   if failed else "")
    heading = title.replace("\n", ", ")
    (out / "scaling.md").write_text(f"# Scaling report: {heading}\n\n{table}\n{failed_line}"
                                    f"\nRuns: {state.tracking_uri}, experiment "
                                    f"{state.experiment!r}, tag sweep_id={state.sweep_id}\n")
    write_csv(rows, out / "scaling.csv")
    pngs = plot(rows, out, title)
    if state.parent_run_id is not None:
        client = state.client()
        for path in [out / "scaling.md", out / "scaling.csv", *pngs]:
            client.log_artifact(state.parent_run_id, str(path), "report")
        client.set_tag(state.parent_run_id, "squall.points_failed", str(len(failed)))
        client.set_tag(state.parent_run_id, "squall.points", str(len(rows)))
        if finish_parent:
            client.set_terminated(state.parent_run_id, "FINISHED")
    if print_table:
        print(f"\nscaling table of sweep {state.sweep_id}:\n")
        print(table)
        if failed_line:
            print(failed_line)
        print(f"report: {out} (scaling.md, scaling.csv, {', '.join(p.name for p in pngs)}); "
              f"runs: {state.tracking_uri} (parent run {state.parent_run_id})")
    return rows
