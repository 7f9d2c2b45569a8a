"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A model whose parameters are sharded (``parallel.shard_parameters``) cannot be saved by rank 0
alone: each rank holds a shard. Its checkpoint is two parts:

* ``checkpoint.pt``: what :func:`squall.train.checkpoint.save_checkpoint` writes (format, step,
  samples seen, scheduler, RNG, extra, identity), written by rank 0, with ``shards`` (the DCP
  directory, relative to the file) in place of the model and optimizer states;
* ``checkpoint.shards/<tag>/``: the model and optimizer states as DCP writes them: every rank its
  shards, indexed by parameter name and global offsets, with optimizer state keyed by parameter
  name (:func:`~torch.distributed.checkpoint.state_dict.get_state_dict`).

DCP reshards on load: the states load into any layout and rank count, sharded or not, in one
process or many. The file is replaced atomically after every rank has written its shards, so a
job killed mid-save keeps the previous checkpoint (whose directory is removed only afterwards).
A single-file checkpoint (full states) loads into a sharded model too: each rank takes its shards
of the full tensors.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from pathlib import Path

import torch.distributed as dist
from torch import nn

from squall.errors import SquallError

#: Key of a sharded checkpoint file naming its DCP directory (relative to the file's folder).
SHARDS_KEY = "shards"


def _misfit(path, err: Exception) -> SquallError:
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return SquallError(f"checkpoint {path} does not fit this model ({first}); use another run_dir "
                       "or the same model and graph config")  # fmt: skip


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's warning that it runs in one process (a deliberate P=1 save or load)."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to",
                                    category=UserWarning)  # fmt: skip
        yield


def shards_root(path: Path) -> Path:
    """Folder of the DCP directories of the checkpoint file ``path``."""
    return path.with_name(f"{path.stem}.shards")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _states(model: nn.Module, optimizer, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=full)), None
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=full))


def save_sharded(path, model: nn.Module, optimizer, scheduler, step: int, samples_seen: int,
                 extra=None) -> Path:  # fmt: skip
    """Write a sharded checkpoint at ``path`` (collective: every rank calls it).

    Parameters are as :func:`squall.train.checkpoint.save_checkpoint`'s.
    """
    import torch.distributed.checkpoint as dcp

    from squall.train.checkpoint import run_payload, write_atomic

    path = Path(path)
    root = shards_root(path)
    main = not _distributed() or dist.get_rank() == 0
    # a fresh directory per save (named by rank 0), so the one the file names is never touched
    tag = [f"step{int(step):09d}-{time.time_ns()}"]
    if _distributed():
        dist.broadcast_object_list(tag, src=0)
    target = root / tag[0]
    if main:
        target.mkdir(parents=True, exist_ok=True)
    if _distributed():
        dist.barrier()
    model_state, optim_state = _states(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=target)
    if main:
        payload = {SHARDS_KEY: str(target.relative_to(path.parent)),
                   **run_payload(model, scheduler, step, samples_seen, extra)}  # fmt: skip
        write_atomic(payload, path)  # the checkpoint is now the new one
        for old in root.iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return path


def shards_dir(path, payload: dict) -> Path:
    """The DCP directory a sharded checkpoint file names."""
    return Path(path).parent / payload[SHARDS_KEY]


def _optimizer_by_name(model: nn.Module, optimizer_state: dict) -> dict:
    """A single-file checkpoint's optimizer state (keyed by parameter position) keyed by
    parameter name, as :func:`~torch.distributed.checkpoint.state_dict.set_state_dict` takes it
    (the trainer's optimizer holds ``model.parameters()`` that require grad, in order)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    state = {names[i]: v for i, v in optimizer_state["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]}
              for g in optimizer_state["param_groups"]]  # fmt: skip
    return {"state": state, "param_groups": groups}


def load_states(path, payload: dict, model: nn.Module, optimizer=None) -> None:
    """Load the model (and optimizer) states of the checkpoint ``payload`` read from ``path`` into
    ``model`` of any layout: sharded checkpoints through DCP (collective when distributed), a
    single-file checkpoint's full states into a sharded model.

    Raises
    ------
    SquallError
        The checkpoint does not fit the model (one line).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    path = Path(path)
    if SHARDS_KEY not in payload:  # full states into a sharded model
        optim = None
        if optimizer is not None:
            optim = _optimizer_by_name(model, payload["optimizer"])
        try:
            _set_states(model, optimizer, payload["model"], optim,
                        StateDictOptions(full_state_dict=True))  # fmt: skip
        except (RuntimeError, KeyError, ValueError) as err:
            raise _misfit(path, err) from None
        return
    where = shards_dir(path, payload)
    if not where.is_dir():
        raise SquallError(f"checkpoint {path} names shards {where} that are missing: delete the "
                          "checkpoint to start afresh")  # fmt: skip
    model_state, optim_state = _states(model, optimizer)
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optim_state
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=where)
    except Exception as err:  # DCP wraps rank failures in its own types
        raise _misfit(path, err) from None
    _set_states(model, optimizer, state["model"], state.get("optimizer"))


def _set_states(model, optimizer, model_state, optim_state, options=None) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(model, model_state, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state, options=options)  # fmt: skip


class ShardedPayload(dict):
    """A sharded checkpoint file's dict whose ``"model"`` (the whole model's state, CPU tensors)
    is read from its DCP directory on first use, so readers of single-file checkpoints (a
    forecast) take either; ``"model" in payload`` stays false."""

    def __init__(self, path, payload: dict):
        super().__init__(payload)
        self.path = Path(path)

    def __missing__(self, key):
        if key != "model":
            raise KeyError(key)
        self["model"] = state = full_model_state(self.path, self)
        return state


def full_model_state(path, payload: dict) -> dict:
    """The whole model's state dict (CPU tensors) of a checkpoint, sharded or not, in this process
    alone (a forecast's load)."""
    if SHARDS_KEY not in payload:
        return payload["model"]
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    where = shards_dir(path, payload)
    if not where.is_dir():
        raise SquallError(f"checkpoint {path} names shards {where} that are missing")
    with _single_process_quiet():
        return _load_state_dict_from_keys({"model"}, checkpoint_id=where)["model"]


__all__ = ["SHARDS_KEY", "ShardedPayload", "full_model_state", "load_states", "save_sharded", "shards_dir",
           "shards_root"]  # fmt: skip
