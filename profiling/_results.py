"""Shared helpers for benchmark scripts: machine/version info and appending result rows."""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    """Short sha (+dirty) of the checkout; ``SQUALL_GIT_SHA`` wins (device machines carry no .git)."""
    if os.environ.get("SQUALL_GIT_SHA"):
        return os.environ["SQUALL_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=RESULTS.parent, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=RESULTS.parent, timeout=10)  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """Date, host CPU/GPU, versions and git sha for one result row."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "git": git_sha(),
    }


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV; older files may hold several header lines (each begins with the
    first column's name) and each starts a new section."""
    rows, header = [], None
    for line in csv.reader(path.read_text().splitlines()):
        if header is None or (line and line[0] == header[0]):
            header = line
            continue
        rows.append(dict(zip(header, line, strict=False)))
    return rows


def append_rows(filename: str, rows: list[dict]) -> Path:
    """Append rows to results/<filename>; when the columns change, the file is rewritten once with
    the union of columns (older rows leave new columns empty)."""
    path = RESULTS / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    old_header = (
        next(csv.reader(path.read_text().splitlines()[:1]), None) if path.exists() else None
    )
    if old_header is not None and set(fields) <= set(old_header):
        with open(path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=old_header).writerows(rows)
        return path
    old_rows = read_rows(path) if old_header is not None else []
    return write_rows(path, [*old_rows, *rows], [*(old_header or []), *fields])


def write_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """Replace ``path`` with ``rows`` (columns: ``fields``, else the rows' keys in first-seen
    order), written to a temporary file first so a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(fields or (k for row in rows for k in row)))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path
