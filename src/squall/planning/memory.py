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

import contextlib
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


@contextlib.contextmanager
def cuda_autocast_norms():
    """Layer norms as CUDA's autocast runs them, on any device: in fp32, on an fp32 copy of their
    input (which their backward keeps); CPU's autocast runs them in the input's dtype."""
    plain = torch.nn.functional.layer_norm
    torch.nn.functional.layer_norm = lambda x, *a, **k: plain(x.float(), *a, **k)
    try:
        yield
    finally:
        torch.nn.functional.layer_norm = plain


class _SavesAsTriton(torch.autograd.Function):
    """The fused Triton attention's memory on any device: the output from the torch reference
    (computed without autograd), and saved for the backward exactly what
    :class:`squall.kernels.gt_attention.op._FusedAttention` saves (q, k, v as the kernels read
    them, the edge inputs, the edge projection and an fp32 log-sum-exp per row and head)."""

    @staticmethod
    def forward(ctx, q, k, v, attr, weight, bias, index):
        from squall.kernels.gt_attention import op
        from squall.kernels.gt_attention.reference import gt_attention_reference, project_edges

        with torch.no_grad():
            edge = project_edges(attr, weight, bias, q.shape[1]).to(q.dtype)
            out = gt_attention_reference(q, k, v, edge, index.colptr, index.row, index.dst)
        sq, sk, sv = op._qkv(q, k, v)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(sq, sk, sv, attr.contiguous(), weight.contiguous(),
                              bias.contiguous(), lse)  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, attr, weight, bias = (torch.zeros_like(t) for t in ctx.saved_tensors[:6])
        return q, k, v, attr, weight, bias, None


def count_block(channels: int = 64, heads: int = 4, mlp_ratio: int = 4, n_dst: int = 200,
                n_src: int = 331, degree: int = 4, edge_dim: int = 11, bipartite: bool = True,
                autocast: bool = True, policy: str = "none", triton: bool = True,
                device: str = "cpu") -> dict:  # fmt: skip
    """What one GraphTransformer block keeps for its backward, counted tensor by tensor.

    Runs one block forward (``policy`` ``none``, or ``mlp``: its MLP recomputed) on random
    rows under :class:`ActivationCounter` (bf16 autocast or fp32) and sorts the storages alive
    after the forward (autocast's cache freed, the block's output dropped) by the dimension they
    are sized by. ``triton``: on CUDA the fused Triton kernels run; on CPU the attention saves
    what they save (:class:`_SavesAsTriton`); else the torch reference's autograd graph. On CPU
    under autocast, layer norms run in fp32 as CUDA's autocast runs them.

    Returns
    -------
    dict
        ``dst``, ``src``: bytes kept per destination / source row per channel (divide by the
        activation's bytes for values of ``channels`` per row); ``edge``: bytes per edge;
        ``weights``: bytes of weight copies kept; ``other``: anything else (bytes). For a
        processor block (``bipartite`` False) the sources are the destinations: ``src`` is 0.
    """
    import squall.layers.graph_transformer as gt
    from squall.kernels.edge_index import EdgeIndex

    n_src = n_src if bipartite else n_dst
    gen = torch.Generator().manual_seed(0)
    colptr = torch.arange(0, n_dst * degree + 1, degree)
    index = EdgeIndex.from_csc(colptr, torch.randint(0, n_src, (n_dst * degree,), generator=gen),
                               n_src)  # fmt: skip
    dev = torch.device(device)
    real_triton = triton and dev.type == "cuda"
    index = index.to(dev)
    block = gt.GraphTransformerBlock(channels, heads, edge_dim, mlp_ratio, bipartite,
                                     "triton" if real_triton else "torch",
                                     recompute_mlp=policy == "mlp").to(dev)  # fmt: skip
    # the residual stream as the model's blocks get it: a linear layer's output, bf16 under
    # autocast
    dtype = torch.bfloat16 if autocast else torch.float32
    x_src = torch.randn(1, n_src, channels, generator=gen, dtype=dtype).to(dev).requires_grad_()
    x_dst = (torch.randn(1, n_dst, channels, generator=gen, dtype=dtype).to(dev).requires_grad_()
             if bipartite else x_src)  # fmt: skip
    attr = torch.randn(n_dst * degree, edge_dim, generator=gen).to(dev)
    sizes = {n_dst: "dst", n_src: "src", n_dst * degree: "edge"}
    if len(sizes) < (3 if bipartite else 2) or channels in sizes or mlp_ratio * channels in sizes:
        raise ValueError("row, source and edge counts must differ from each other and from the "
                         "channel widths")  # fmt: skip
    plain = gt.gt_attention_fused

    def stand_in(q, k, v, a, w, b, idx, backend):
        return _SavesAsTriton.apply(q, k, v, a, w, b, idx)

    counter = ActivationCounter()
    if triton and not real_triton:
        gt.gt_attention_fused = stand_in
    norms = cuda_autocast_norms() if autocast and dev.type == "cpu" else contextlib.nullcontext()
    try:
        with counter, norms:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = block(x_src, x_dst, attr, index)
            counter.mark("forward")
    finally:
        gt.gt_attention_fused = plain
    out_rec = counter._records.get(out.untyped_storage().data_ptr())
    totals = dict.fromkeys(("dst", "src", "edge", "weights", "other"), 0)
    weights = {tuple(p.shape) for p in block.parameters()}
    for r in counter._snapshots["forward"]:
        if r is out_rec or r.ref.expired():  # the output is the next block's input
            continue
        dims = [d for d in r.shape if d in sizes]
        kind = sizes[dims[0]] if dims else ("weights" if r.shape in weights else "other")
        totals[kind] += r.nbytes
    del out
    return {"dst": totals["dst"] / (n_dst * channels), "src": totals["src"] / (n_src * channels),
            "edge": totals["edge"] / (n_dst * degree), "weights": totals["weights"],
            "other": totals["other"]}  # fmt: skip


__all__ = ["ActivationCounter", "count_block", "count_step", "cuda_autocast_norms"]
