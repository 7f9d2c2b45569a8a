"""Scaling report of a sweep from its MLflow runs: table (markdown + CSV), PNG plots, printed.

    python -m jobs.report                          # the latest sweep under $SQUALL_CACHE/sweeps
    python -m jobs.report .cache/squall/sweeps/2026-11-27_01-54-51
    python -m jobs.report SWEEP_DIR --out /tmp/report
    python -m jobs.report --sync DIR               # send tracking journals left below DIR

``python -m jobs.scale --multirun`` runs it by itself when the sweep ends. Files go to
``<sweep dir>/report`` (or ``--out``) and are logged as artifacts (``report/``) of the sweep's
parent MLflow run. Failed points are listed with their reason.

``--sync DIR`` sends what runs below DIR (a sweep, a point or a run directory, or the
``mlflow/journal`` directory of the cache) could not send while their tracking server was down:
every journal found, in order, each record once; it exits 1 if something could not be sent yet.
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
from squall.tracking import sync_tree


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
    parser.add_argument("--sync", type=Path, metavar="DIR",
                        help="send the tracking journals left below DIR (a sweep or run "
                             "directory) to their server, then exit")
    args = parser.parse_args(argv)
    if args.sync is not None:
        return sync(args.sync)
    root = Path(os.environ.get("SQUALL_CACHE", ".cache/squall")) / "sweeps"
    sweep_dir = args.sweep_dir or latest_sweep(root)
    if not (sweep_dir / STATE_FILE).is_file():
        raise SquallError(f"{sweep_dir} is not a sweep directory: it has no {STATE_FILE}")
    report_sweep(SweepState.load(sweep_dir), out_dir=args.out, print_table=True,
                 finish_parent=not args.keep_parent_open)
    return 0


def sync(directory: Path) -> int:
    """Send every journal below ``directory``; print one line per journal; 0 if all arrived."""
    if not directory.is_dir():
        raise SquallError(f"{directory} is not a directory")
    results = sync_tree(directory)
    if not results:
        print(f"no tracking journal below {directory}: nothing to send")
        return 0
    for r in results:
        run = r.run_id or "(run not created yet)"
        if r.left:
            print(f"{r.journal}: run {run}: sent {r.sent}, {r.left} left: {r.error}")
        else:
            print(f"{r.journal}: run {run}: sent {r.sent} record(s), complete")
    left = [r for r in results if r.left]
    if left:
        print(f"error: {len(left)} of {len(results)} journal(s) not sent completely; "
              f"run `python -m jobs.report --sync {directory}` again once the server answers",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
