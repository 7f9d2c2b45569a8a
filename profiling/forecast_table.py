"""profiling/results/forecast.csv (and forecast_writer.csv) -> forecast.md: the newest GPU
rollouts, the targets they meet, the cost of writing fields and where its host time goes.

    python profiling/forecast_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, read_rows  # noqa: E402

# Targets users plan with: 60-step (15-day) rollout seconds on one GPU, the two-GPU speed-up and
# the cost of writing every field.
TOTAL_S_TARGET = {"o96_l6": 6.0, "o320_l7": 25.0}
TWO_GPU_SPEEDUP_TARGET = 1.8
WRITE_OVERHEAD_TARGET_PCT = 5.0
#: Variants bench_forecast.py runs now; older names (e.g. a writer-thread count) stay in the
#: history table only.
VARIANTS = ("plain", "zarr", "zarr-lz4", "zarr-zstd", "graphs", "graphs+zarr")
#: Grid sizes of the writer stages, by number of points.
GRIDS = {"40320": "o96", "421120": "o320"}


def same_call(rows: list[dict], graph: str, variant: str, ranks: str, git: str) -> dict | None:
    """The newest row of ``(graph, variant, ranks)`` from the same run (git), or None: overheads
    and speed-ups compare rows of one call only."""
    found = [r for r in rows if (r["graph"], r["variant"], r["ranks"], r["git"])
             == (graph, variant, ranks, git)]  # fmt: skip
    return found[-1] if found else None


def write_overhead(rows: list[dict], r: dict) -> float | None:
    """Percent a writing row's total adds to the same call's row without writing."""
    base = "graphs" if r["variant"].startswith("graphs") else "plain"
    plain = same_call(rows, r["graph"], base, r["ranks"], r["git"])
    if "zarr" not in r["variant"] or plain is None or plain is r:
        return None
    return 100 * (float(r["total_s"]) / float(plain["total_s"]) - 1)


def layout(r: dict) -> str:
    """The store layout a row wrote (rows before the ``compression`` column: one chunk per
    variable, denormalised and transposed on the host)."""
    if "zarr" not in r["variant"]:
        return ""
    if r.get("compression"):
        return f"chunk per field, {r['compression']}"
    return "chunk per variable, lz4 (host layout)"


def rollout_table(rows: list[dict]) -> list[str]:
    newest = {}
    for r in rows:  # the newest row of each (graph, variant, ranks)
        if r["variant"] in VARIANTS:
            newest[(r["graph"], r["variant"], r["ranks"])] = r
    lines = ["| graph | variant | GPUs | s/step | total s | CPU s | peak GiB | zarr GB | "
             "write +% | target | git (host cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (graph, variant, ranks), r in sorted(newest.items()):
        total = float(r["total_s"])
        write = write_overhead(rows, r)
        target = ""
        if variant == "plain" and ranks == "1" and graph in TOTAL_S_TARGET:
            limit = TOTAL_S_TARGET[graph]
            target = f"< {limit:g} s: {'met' if total < limit else 'missed'}"
        one = same_call(rows, graph, "plain", "1", r["git"])
        if variant == "plain" and ranks != "1" and one is not None:
            speedup = float(one["total_s"]) / total
            verdict = "met" if speedup >= TWO_GPU_SPEEDUP_TARGET else "missed"
            target = f"{speedup:.2f}x of 1 GPU (>= {TWO_GPU_SPEEDUP_TARGET}x: {verdict})"
        if write is not None:
            verdict = "met" if write < WRITE_OVERHEAD_TARGET_PCT else "missed"
            target = f"< {WRITE_OVERHEAD_TARGET_PCT:g} %: {verdict}"
            if not r.get("compression"):
                target += " (chunk-per-variable writer, not rerun since)"
        lines.append(f"| {graph} | {variant} | {ranks} | {float(r['s_per_step']):.4f} | "
                     f"{total:.2f} | {r.get('cpu_s') or ''} | {float(r['peak_GiB']):.2f} | "
                     f"{r.get('zarr_GB') or ''} | {'' if write is None else f'{write:+.1f}'} | "
                     f"{target} | {r['git']} ({r['cpus']}) |")  # fmt: skip
    return lines


def history_table(rows: list[dict]) -> list[str]:
    lines = ["| graph | variant | store layout | total s | write +% | rollout waited on the "
             "writer s | git (host cores) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["graph"], r["date"])):
        write = write_overhead(rows, r)
        if write is None or r["ranks"] != "1":
            continue
        lines.append(f"| {r['graph']} | {r['variant']} | {layout(r)} | {float(r['total_s']):.2f} "
                     f"| {write:+.1f} | {r.get('write_wait_s') or ''} | {r['git']} ({r['cpus']}) "
                     "|")  # fmt: skip
    return lines


def writer_table(rows: list[dict]) -> list[str]:
    """The newest call's writer stages per grid."""
    git = rows[-1]["git"]
    rows = [r for r in rows if r["git"] == git]
    lines = [f"Host of {rows[0]['gpu']} ({rows[0]['cpus']} cores), git {git}, 100 variables, "
             "random normal fields (ratio about 1.1: Blosc's cost on incompressible data; "
             "weather fields compress better at about the same speed):", "",
             "| grid | field MB | stage | ms/field | GB/s | ratio |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {GRIDS.get(r['grid'], r['grid'])} | {r['field_MB']} | {r['stage']} | "
                     f"{1e3 * float(r['s_per_field']):.1f} | {r['GBps']} | "
                     f"{r.get('ratio') or ''} |")  # fmt: skip
    return lines


def main() -> None:
    rows = [r for r in read_rows(RESULTS / "forecast.csv") if r["gpu"] not in ("", "none")]
    if not rows:
        raise SystemExit("no GPU rows in profiling/results/forecast.csv")
    first = rows[-1]
    lines = [
        "# 15-day forecast rollouts (profiling/bench_forecast.py)",
        "",
        f"{first['gpu']}, torch {first['torch']}, triton {first['triton']}; 1024 channels x 16 "
        "layers x 16 heads, 100 fields, 60 steps of 6 h, bf16 autocast, inference mode, random "
        "weights. `s/step`: median CUDA-event time of a step; `total`: wall time of the rollout "
        "until the last field is on disk; `CPU s`: the process's CPU time over it (all "
        "threads). Writing variants write every field of every step to zarr on the host's local "
        "disk (`zarr`: raw chunks, `zarr-lz4`: Blosc lz4). Generated by "
        "`profiling/forecast_table.py` from forecast.csv. Overheads and speed-ups compare rows "
        "of the same call (same git column). The `graphs` variants' peak is measured after the "
        "capture (warm-up), so it leaves out the CUDA graph's private memory pool: compare "
        "`plain` rows for memory.",
        "",
        *rollout_table(rows),
        "",
        "## Cost of writing every field, by store layout",
        "",
        "Every measured writing rollout on one GPU against the rollout without writing of the "
        "same call. `chunk per variable` (before): the writer thread denormalised and transposed "
        "each field on the host and zarr wrote 100 Blosc chunks per step. `chunk per field`: "
        "the field is denormalised and laid out on the GPU, copied to pinned memory on a side "
        "stream, and written as one file per step outside Python's lock "
        "(`squall.train.forecast_store`).",
        "",
        *history_table(rows),
    ]
    writer_rows = [r for r in read_rows(RESULTS / "forecast_writer.csv")
                   if r["gpu"] not in ("", "none")] if (RESULTS / "forecast_writer.csv").exists() else []  # fmt: skip
    if writer_rows:
        lines += [
            "",
            "## Where a field's host time goes (profiling/bench_forecast_writer.py)",
            "",
            *writer_table(writer_rows),
            "",
            "`denormalise_host`, `transpose_host`: the host work the writer thread did per field "
            "before it moved to the GPU; `zarr_per_variable_*` / `zarr_one_chunk_*`: zarr's API "
            "writing one field as 100 chunks or as one; `writer_*`: the forecast store's writer "
            "end to end from CPU tensors, i.e. with the denormalisation and layout on the host "
            "(on a GPU they run on the device). The CSV's `gil_free_pct` (a pure-Python loop's "
            "speed beside the writer, against its speed alone) is not shown: its baseline, "
            "measured once per grid on a VM, came out below the loop's speed during the writer "
            "rows (105 to 158 %).",
        ]
    out = RESULTS / "forecast.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
