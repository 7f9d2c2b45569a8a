"""Scaling report of a sweep from its MLflow runs: table (markdown + CSV), PNG plots, printed.

    python -m jobs.report                          # the latest sweep under $SQUALL_CACHE/sweeps
    python -m jobs.report .cache/squall/sweeps/2026-11-27_01-54-51
    python -m jobs.report SWEEP_DIR --out /tmp/report

``python -m jobs.scale --multirun`` runs it by itself when the sweep ends. Files go to
``<sweep dir>/report`` (or ``--out``) and are logged as artifacts (``report/``) of the sweep's
parent MLflow run. Failed points are listed with their reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs._entry import user_errors
from squall.errors import SquallError
from squall.scaling.report import report_sweep
from squall.scaling.sweep import STATE_FILE, SweepState


def latest_sweep(root: Path) -> Path:
    """The most recently started sweep under ``root`` (one holding a ``sweep.json``)."""
    found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SquallError(f"no sweep under {root}: run `python -m jobs.scale --multirun` first, "
                          "or name the sweep directory")
    return found[-1].parent


@user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path,
                        help="sweep directory (holds sweep.json); default: the latest one")
    parser.add_argument("--out", type=Path, help="directory for the report files")
    parser.add_argument("--keep-parent-open", action="store_true",
                        help="leave the parent run's status as it is")
    args = parser.parse_args(argv)
    root = Path(os.environ.get("SQUALL_CACHE", ".cache/squall")) / "sweeps"
    sweep_dir = args.sweep_dir or latest_sweep(root)
    if not (sweep_dir / STATE_FILE).is_file():
        raise SquallError(f"{sweep_dir} is not a sweep directory: it has no {STATE_FILE}")
    report_sweep(SweepState.load(sweep_dir), out_dir=args.out, print_table=True,
                 finish_parent=not args.keep_parent_open)
    return 0


if __name__ == "__main__":
    sys.exit(main())
