"""Count the activation memory a step really holds, tensor by tensor, on any device.

:class:`ActivationCounter` is a ``TorchDispatchMode``: every storage an operator creates while it
is active is recorded (bytes, the operator, its shape) with a weak reference, so that the bytes
still alive at any moment are the storages whose weak reference has not expired. Parameters,
buffers and inputs made before the counter started are not counted; what is counted is what the
step itself allocates: saved activations, the inputs a checkpointed block keeps, halo buffers,
copies, gradients and their transients.

Two numbers per step, both exact counts (no allocator rounding, no caching):

* ``held_bytes``: alive at the end of the forward, i.e. what autograd (and checkpoints) keep for
  the backward plus the output;
* ``peak_bytes``: the largest total alive at any operator boundary of forward and backward.

:meth:`ActivationCounter.breakdown` groups the storages alive at a mark by the operator that made
them and their shape: the per-tensor accounting that shows which tensors keep their full size
when the graph is split over ranks. It works on CPU (gloo) and CUDA alike; on CUDA
``torch.cuda.memory_allocated`` gives the same totals plus allocator rounding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class _Record:
    ref: StorageWeakRef
    nbytes: int
    op: str
    shape: tuple
    dtype: torch.dtype
    phase: str


class ActivationCounter(TorchDispatchMode):
    """Record every storage created by an operator while active (see the module docstring).

    Use as a context manager around forward and backward; call :meth:`mark` between them.

    Attributes
    ----------
    peak_bytes : int
        Largest sum of live recorded storages at an operator boundary.
    marks : dict of str to int
        Live recorded bytes at each :meth:`mark`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._records: dict[int, _Record] = {}
        self._live = 0
        self._ops_since_sweep = 0
        self.peak_bytes = 0
        self.marks: dict[str, int] = {}
        self._snapshots: dict[str, list[_Record]] = {}
        self.phase = "forward"

    def _sweep(self) -> None:
        dead = [k for k, r in self._records.items() if r.ref.expired()]
        for k in dead:
            self._live -= self._records.pop(k).nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # frees happen between operators: account for them before adding the new outputs, so
        # the peak is the sum live at this operator's end
        self._sweep()
        # an output sharing an input's storage (a view, an in-place op) allocates nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}  # fmt: skip
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr() if storage.nbytes() else None
            if key is None or key in inputs:
                continue
            if key in self._records and not self._records[key].ref.expired():
                continue  # another output of the same storage
            rec = _Record(StorageWeakRef(storage), storage.nbytes(), str(func.overloadpacket),
                          tuple(t.shape), t.dtype, self.phase)  # fmt: skip
            self._records[key] = rec
            self._live += rec.nbytes
        self.peak_bytes = max(self.peak_bytes, self._live)
        return out

    def live_bytes(self) -> int:
        """Bytes of the recorded storages alive now."""
        self._sweep()
        return self._live

    def mark(self, name: str) -> int:
        """Record the live bytes now under ``name`` (e.g. ``"forward"`` before the backward) and
        keep the live storages for :meth:`breakdown`; returns the bytes."""
        self.marks[name] = self.live_bytes()
        self._snapshots[name] = list(self._records.values())
        self.phase = f"after {name}"
        return self.marks[name]

    def breakdown(self, name: str, top: int = 20) -> list[dict]:
        """Storages alive at mark ``name``, grouped by (operator, shape, dtype), largest first.

        Returns
        -------
        list of dict
            ``op``, ``shape``, ``dtype``, ``count`` and ``bytes`` (that group's total), at most
            ``top`` groups.
        """
        groups: Counter = Counter()
        counts: Counter = Counter()
        for r in self._snapshots[name]:
            key = (r.op, r.shape, str(r.dtype).replace("torch.", ""))
            groups[key] += r.nbytes
            counts[key] += 1
        return [{"op": k[0], "shape": list(k[1]), "dtype": k[2], "count": counts[k], "bytes": b}
                for k, b in groups.most_common(top)]  # fmt: skip


def count_step(forward, backward=None) -> tuple[dict, ActivationCounter]:
    """Count one step: ``loss = forward()`` then ``backward(loss)`` (default ``loss.backward()``).

    Returns
    -------
    (dict, ActivationCounter)
        ``held_bytes`` (alive after the forward: what the backward needs, plus the loss) and
        ``peak_bytes`` (forward and backward), and the counter for :meth:`~ActivationCounter.
        breakdown` of the mark ``"forward"``.
    """
    counter = ActivationCounter()
    with counter:
        loss = forward()
        held = counter.mark("forward")
        (backward or (lambda t: t.backward()))(loss)
        del loss
    return {"held_bytes": held, "peak_bytes": counter.peak_bytes}, counter


__all__ = ["ActivationCounter", "count_step"]
