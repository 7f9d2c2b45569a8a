"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One file holds the model, optimiser and scheduler states, the step, the number of samples drawn
(the data position), and the RNG states of python, numpy, torch and CUDA. Files are written to a
temporary name and renamed, so a job killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from squall.errors import SquallError
from squall.parallel.sharding import is_sharded
from squall.parallel.state import SHARDS_KEY, ShardedPayload, load_states

FORMAT_VERSION = 1


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - legacy global state other code may draw from
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_payload(model, scheduler, step: int, samples_seen: int, extra=None) -> dict:
    """Everything a checkpoint holds besides the model and optimizer tensors."""
    return {
        "format": FORMAT_VERSION,
        "scheduler": scheduler.state_dict(),
        "step": int(step),
        "samples_seen": int(samples_seen),
        "rng": rng_state(),
        "extra": extra or {},
        # graph and architecture, so a forecast can refuse a checkpoint of another model
        "identity": model.identity() if hasattr(model, "identity") else None,
    }


def write_atomic(payload: dict, path: Path) -> Path:
    """``torch.save`` to a temporary name beside ``path``, then rename: readers see the old file
    or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(path, model, optimizer, scheduler, step: int, samples_seen: int, extra=None):
    """Atomically write a checkpoint to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               **run_payload(model, scheduler, step, samples_seen, extra)}  # fmt: skip
    return write_atomic(payload, path)


def checkpoint_extra(path) -> dict:
    """The ``extra`` dict and ``step`` of the checkpoint at ``path``, without reading its tensors
    (memory-mapped); ``{}`` for a file that is not a readable squall checkpoint."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # unreadable: load_checkpoint explains it when the run resumes
        return {}
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        return {}
    return {**payload.get("extra", {}), "step": int(payload.get("step", 0))}


def read_payload(path, advice: str, error: type[SquallError] = SquallError) -> dict:
    """The checkpoint dict at ``path`` (CPU tensors), or ``error`` in one line: not found,
    unreadable (then ``advice`` says what to do), or not a squall checkpoint of this format."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise error(f"checkpoint {path} not found") from None
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise error(f"checkpoint {path} cannot be read ({type(err).__name__}): {advice}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise error(f"checkpoint {path} is not a squall checkpoint of format {FORMAT_VERSION}")
    return ShardedPayload(path, payload) if SHARDS_KEY in payload else payload


def load_checkpoint(path, model, optimizer=None, scheduler=None, restore_rng=True) -> dict:
    """Restore states from ``path`` into the given objects; return the checkpoint dict."""
    path = Path(path)
    payload = read_payload(path, "delete it to start afresh")
    if SHARDS_KEY in payload or is_sharded(model):  # DCP: any layout, any rank count
        load_states(path, payload, model, optimizer)
        return _load_rest(payload, scheduler, restore_rng)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise SquallError(
            f"checkpoint {path} does not fit this model ({first}); use another run_dir or the "
            "same model and graph config"
        ) from None
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return _load_rest(payload, scheduler, restore_rng)


def _load_rest(payload: dict, scheduler, restore_rng: bool) -> dict:
    if scheduler is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload
