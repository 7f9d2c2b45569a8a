"""``python -m jobs.make_dataset`` in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from squall.data.zarr_dataset import read_info

ROOT = Path(__file__).resolve().parents[2]


def _run(*overrides, tmp_path):
    args = [sys.executable, "-m", "jobs.make_dataset", f"paths.cache={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'out'}", *overrides]  # fmt: skip
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_job_writes_dataset(tmp_path):
    path = tmp_path / "o32.zarr"
    done = _run(f"data.path={path}", "data.generator.num_times=10", "data.generator.seed=4",
                tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["path"] == str(path) and summary["times"] == 10 and summary["points"] == 5248
    info = read_info(path)
    assert info.shape == (10, len(summary["variables"]), 1, 5248)
    assert info.attrs["synthetic"]["seed"] == 4 and info.attrs["resolution"] == "O32"

    again = _run(f"data.path={path}", tmp_path=tmp_path)
    assert again.returncode == 0 and "exists" in again.stdout


def test_job_reports_bad_input_in_one_line(tmp_path):
    done = _run(f"data.path={tmp_path / 'x.zarr'}", "data.variables=[msl,q_700]",
                tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: synthetic generator cannot make ['q_700']")
    assert len(done.stderr.strip().splitlines()) == 1


def test_job_writes_the_driver_of_a_forced_lam(tmp_path):
    lam = ["graph=lam_alps", "graph.name=lam_tiny", "graph.nodes.data.resolution=1.0",
           "graph.nodes.data.region=[30,60,0,40]", "graph.nodes.data.boundary.width_deg=3.0",
           "graph.nodes.hidden.level=5", "graph.nodes.hidden.region=[30,60,0,40]",
           "graph.edges.encoder.factor=0.7", "data.boundary.grid=O16",
           "data.generator.num_times=12"]  # fmt: skip
    done = _run(*lam, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    lam_info, driver_info = read_info(summary["path"]), read_info(summary["driver"])
    assert summary["driver"] == str(tmp_path / "cache" / "datasets" / "lam_tiny-driver-O16.zarr")
    assert driver_info.attrs["resolution"] == "O16" and driver_info.num_grid == 1600  # 4 N^2 + 36 N
    assert (driver_info.dates == lam_info.dates).all()

    kept = _run(*lam, tmp_path=tmp_path)
    assert kept.returncode == 0 and f"driver {summary['driver']} in place" in kept.stdout
    # regenerated with other weather: the driver is replaced with it, not left stale
    again = _run(*lam, "data.generator.overwrite=true", "data.generator.seed=7", tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr
    assert read_info(summary["path"]).attrs["synthetic"]["seed"] == 7
    assert read_info(summary["driver"]).attrs["synthetic"]["seed"] == 7

    unforced = _run(*lam, "data.boundary.enabled=false", "graph.name=lam_cut", tmp_path=tmp_path)
    assert unforced.returncode == 0, unforced.stderr
    assert "driver" not in json.loads(unforced.stdout.strip().splitlines()[-1])
