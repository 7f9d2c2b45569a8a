"""Generate a synthetic dataset on a graph's data grid.

    python -m jobs.make_dataset                                  # default graph and data config
    python -m jobs.make_dataset graph=o96_l6 data.generator.num_times=800
    python -m jobs.make_dataset data.path=/scratch/o32.zarr data.generator.overwrite=true

Writes ``cfg.data.path`` (an anemoi-datasets-like zarr store, see ``squall.data.zarr_dataset``)
and prints one JSON line: path, times, variables, grid points, seconds. An existing store is
kept unless ``data.generator.overwrite=true``. A graph with a forced boundary band
(``graph=lam_alps``) also gets its synthetic driving run (``data.boundary.path``, key ``driver``),
which training would otherwise write on first use.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from jobs._entry import hydra_job
from squall.data.boundary import boundary_config, ensure_driver
from squall.data.setup import synthetic_settings
from squall.data.synthetic import generate
from squall.data.zarr_dataset import read_info
from squall.graphs import load_or_build


def write_dataset(cfg: DictConfig, path: Path, overwrite: bool) -> tuple | None:
    """Generate the store at ``path`` on the graph's data grid: ``(info, grid name)``, or None
    (and a line saying so) when it exists and ``overwrite`` is off."""
    if path.exists() and not overwrite:
        info = read_info(path)
        print(f"dataset {path} exists ({info.shape[0]} times, {len(info.variables)} variables, "
              f"{info.num_grid} points); pass data.generator.overwrite=true to regenerate it "
              "(and its driver)")  # fmt: skip
        return None
    nodes = load_or_build(cfg.graph, cfg.paths.cache + "/graphs").nodes["data"]
    grid = str(nodes.meta.get("grid") or cfg.graph.get("name", ""))
    generate(path, nodes, synthetic_settings(cfg.data), grid_name=grid, overwrite=overwrite)
    return read_info(path), grid


@hydra_job()
def main(cfg: DictConfig) -> None:
    path = Path(str(cfg.data.path))
    overwrite = cfg.data.generator is not None and cfg.data.generator.overwrite
    start = time.perf_counter()
    boundary = boundary_config(cfg)
    with ThreadPoolExecutor(1) as pool:  # the driver beside the LAM data (numpy frees the GIL)
        driver = pool.submit(ensure_driver, cfg, boundary, overwrite) if boundary else None
        written = write_dataset(cfg, path, overwrite)
        extra = {"driver": str(driver.result())} if driver else {}
    if written is None:
        if extra:
            print(f"driver {extra['driver']} in place")
        return
    info, grid = written
    print(json.dumps({"path": str(path), "times": info.shape[0], "variables": list(info.variables),
                      "grid": grid, "points": info.num_grid, "start_date": str(info.dates[0]),
                      "end_date": str(info.dates[-1]), **extra,
                      "seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
