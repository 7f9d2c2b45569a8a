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


def append_rows(filename: str, rows: list[dict]) -> Path:
    """Append rows to results/<filename>, writing a header when the file is new or columns change."""
    path = RESULTS / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    new = not path.exists() or path.read_text().splitlines()[:1] != [",".join(fields)]
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
