"""The inputs every point of a sweep shares: the graph cache and the (synthetic) dataset."""

from __future__ import annotations

import fcntl
from pathlib import Path

from squall.data.setup import ensure_dataset
from squall.graphs import load_or_build


def build_inputs(cfg) -> None:
    """Build the graph cache and the synthetic dataset of ``cfg`` if missing, one process at a
    time: points of a sweep that run side by side (a Slurm array), and the driver preparing them
    ahead, share the cache directory (an exclusive lock on ``<paths.cache>/.prepare.lock``)."""
    cache = Path(str(cfg.paths.cache))
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            graph = load_or_build(cfg.graph, cache / "graphs")
            ensure_dataset(cfg, graph.nodes["data"])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
