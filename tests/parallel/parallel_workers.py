"""Process-group helpers for tests/parallel: spawn gloo ranks, tiny graphs and models.

Imported by the test modules and, by name, by the spawned ranks (spawn copies ``sys.path``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
import uuid

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from squall.graphs import build_graph
from squall.models.forecaster import GraphForecaster, ModelConfig

# Generous for a loaded 2-core CI machine; a hung collective fails the test instead of the job.
COLLECTIVE_TIMEOUT_S = 120


def tiny_spec(grid: str = "O8", level: int = 2) -> dict:
    """O8 grid (544 points) and a level-2 mesh (162 nodes), the graph of tests/models."""
    return {
        "name": f"{grid.lower()}_l{level}",
        "nodes": {"data": {"type": "grid", "grid": grid},
                  "hidden": {"type": "icosahedral", "level": level}},
        "edges": {
            "encoder": {"src": "data", "dst": "hidden", "type": "cutoff", "factor": 0.8},
            "processor": {"src": "hidden", "dst": "hidden", "type": "multiscale"},
            "decoder": {"src": "hidden", "dst": "data", "type": "knn", "k": 3},
        },
    }  # fmt: skip


_GRAPHS: dict = {}


def tiny_graph(grid: str = "O8", level: int = 2):
    key = (grid, level)
    if key not in _GRAPHS:
        _GRAPHS[key] = build_graph(tiny_spec(grid, level))
    return _GRAPHS[key]


def make_model(graph, seed: int = 0, **kw) -> GraphForecaster:
    """Small model with a non-zero head (so gradients reach everything); odd widths on purpose."""
    torch.manual_seed(seed)
    cfg = ModelConfig(num_channels=kw.pop("channels", 12), num_heads=kw.pop("heads", 3),
                      processor_layers=kw.pop("layers", 2), **kw)  # fmt: skip
    model = GraphForecaster(graph, cfg, num_input_vars=5, num_output_vars=4, input_steps=2,
                            residual_map=[(0, 0), (1, 1), (2, 2)])  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return model


def _entry(rank, world, store, fn, args, errors, reached):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))  # fmt: skip
    reached[rank] = "group initialised"
    try:
        fn(rank, world, *args)
        reached[rank] = "check passed"
        # nobody tears the group down while a peer may still be inside a collective with it
        dist.barrier()
    except BaseException:
        errors[rank] = traceback.format_exc()
        raise
    finally:
        dist.destroy_process_group()
    reached[rank] = "check passed, group destroyed"
    # Leave without the interpreter's finalization: a rank was aborted once in CI (SIGABRT,
    # "terminate called without an active exception", no Python error on either rank), as
    # gloo's worker threads can at exit (pytorch/pytorch PR 179291); a rank that got here has
    # passed its check, and an abort before this point still fails the test, saying where.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; re-raise the first rank's error,
    with how far each rank got."""
    store = os.path.join(tempfile.gettempdir(), f"squall-test-{uuid.uuid4().hex}")
    with mp.Manager() as manager:
        errors, reached = manager.dict(), manager.dict()
        try:
            mp.spawn(_entry, args=(world, store, fn, args, errors, reached), nprocs=world,
                     join=True)  # fmt: skip
        except Exception as err:
            where = ", ".join(f"rank {r}: {reached.get(r, 'not started')}" for r in range(world))
            detail = "\n".join(f"rank {r}:\n{t}" for r, t in sorted(errors.items()))
            raise AssertionError(f"distributed check failed ({where})\n{detail}") from err
        finally:
            if os.path.exists(store):
                os.remove(store)
