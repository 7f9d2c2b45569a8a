"""Communication of model parallelism: halo exchange (autograd, optionally asynchronous), node
gathers for evaluation, loss reduction.

Every tensor moved here is node-major on the wire: ``[rows, B, C]``, so that the split sizes of
``all_to_all_single`` count nodes. Model tensors are ``[B, N, C]``.

gloo implements ``all_to_all_single`` with uneven split sizes (alltoallv) on CPU and NCCL on GPU,
so one code path serves both; an asynchronous call returns a work handle whose ``wait`` blocks on
gloo and only orders streams on NCCL (no host synchronisation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.autograd import Function

from squall.parallel.halo import HaloPlan


class _Pending:
    """Shared state of one exchange: the work handle in flight and the buffers it uses, kept
    alive until the wait (forward), and the reverse exchange of the backward."""

    __slots__ = ("exchange", "send", "work", "grad_send", "grad_recv", "bwork")

    def __init__(self, exchange: HaloExchange) -> None:
        self.exchange = exchange
        self.work = self.send = None
        self.bwork = self.grad_send = self.grad_recv = None


class _HaloStart(Function):
    """Forward: gather the owned rows each peer needs (``send_index``) and start
    ``all_to_all_single`` into a ``[n_recv, B, C]`` buffer, valid only after :class:`_HaloWait`.

    The second output is ``x`` itself (a view): computing with it instead of ``x`` routes the
    owned rows' whole gradient through this backward, which adds the returned halo gradients into
    it with one ``index_add`` instead of returning a full-size mostly-zero tensor for autograd to
    add to it (two full passes over ``[B, n_own, C]`` instead of four).

    Backward: wait for the reverse exchange that :class:`_HaloWait`'s backward started (the
    gradients of the rows this rank sent, coming back from every rank that received them) and
    add them into the gradient of the owned rows they were gathered from. A row sent to several
    peers sums their gradients one peer at a time in rank order into a compact buffer over the
    distinct sent rows, so the result is deterministic.
    """

    @staticmethod
    def forward(ctx, x, exchange: HaloExchange, pending: _Pending):
        send = x.index_select(1, exchange.send_index).transpose(0, 1).contiguous()
        recv = x.new_empty((exchange.num_recv, x.shape[0], x.shape[2]))
        pending.send = send
        pending.work = dist.all_to_all_single(
            recv, send, exchange.recv_splits, exchange.send_splits, group=exchange.group,
            async_op=True,
        )  # fmt: skip
        exchange.bytes_sent += send.numel() * send.element_size()
        exchange.rows_sent += exchange.num_send
        ctx.exchange, ctx.shape, ctx.pending = exchange, x.shape, pending
        ctx.set_materialize_grads(False)
        return recv, x

    @staticmethod
    def backward(ctx, _grad_recv, grad_x):
        ex, pending = ctx.exchange, ctx.pending
        b, n, c = ctx.shape
        pending.bwork.wait()
        grad_send = pending.grad_send
        pending.bwork = pending.grad_send = pending.grad_recv = None
        if ex.num_send == 0:
            return grad_x, None, None
        if ex.send_unique:
            rows = grad_send  # every sent row went to one peer: already one gradient per row
        else:
            rows = grad_send.new_zeros((ex.sent_rows.numel(), b, c))
            start = 0
            for count in ex.send_splits:
                if count:  # positions are unique within one peer
                    rows.index_add_(0, ex.send_pos[start : start + count],
                                    grad_send[start : start + count])  # fmt: skip
                start += count
        if grad_x is None:  # the caller computed with x, not the second output
            grad_x = grad_send.new_zeros((b, n, c))
            return grad_x.index_add_(1, ex.sent_rows, rows.transpose(0, 1)), None, None
        return grad_x.index_add(1, ex.sent_rows, rows.transpose(0, 1)), None, None


class _HaloWait(Function):
    """Forward: wait for the exchange started by :class:`_HaloStart` and return the halo rows as
    ``[B, n_recv, C]``.

    Backward: start the reverse exchange: send the gradient of every halo row back to the rank
    that owns it (split sizes swapped). It runs while autograd works through the destinations
    computed before the wait (the interior ones), and :class:`_HaloStart`'s backward waits for it.
    """

    @staticmethod
    def forward(ctx, recv, pending: _Pending):
        pending.work.wait()
        pending.work = pending.send = None
        ctx.pending, ctx.exchange = pending, pending.exchange
        return recv.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        ex, pending = ctx.exchange, ctx.pending
        grad_recv = grad.transpose(0, 1).contiguous()
        grad_send = grad_recv.new_empty((ex.num_send, *grad_recv.shape[1:]))
        pending.grad_recv, pending.grad_send = grad_recv, grad_send
        pending.bwork = dist.all_to_all_single(
            grad_send, grad_recv, ex.send_splits, ex.recv_splits, group=ex.group, async_op=True
        )
        ex.bytes_sent += grad_recv.numel() * grad_recv.element_size()
        ex.rows_sent += ex.num_recv
        return grad_recv, None


class PendingHalo:
    """An exchange in flight; :meth:`wait` returns the halo rows ``[B, n_recv, C]``."""

    def __init__(self, recv: torch.Tensor, source: torch.Tensor, pending: _Pending):
        self._recv, self._pending = recv, pending
        # the owned rows to compute with: their gradient then takes the halo's in one pass
        self.source = source

    def wait(self) -> torch.Tensor:
        return _HaloWait.apply(self._recv, self._pending)


class HaloExchange:
    """Halo exchange of one edge set on one rank of a model-parallel group.

    Parameters
    ----------
    plan : HaloPlan
        This rank's plan (its ``rank`` is the rank in ``group``).
    group : ProcessGroup, optional
        The model-parallel group (default: the world).
    device : torch.device or str
        Where the send index lives (the model's device).
    """

    def __init__(self, plan: HaloPlan, group=None, device="cpu"):
        self.plan, self.group = plan, group
        self.send_index = torch.from_numpy(plan.send_index).to(device)
        self.send_splits = [int(c) for c in plan.send_counts]
        self.recv_splits = [int(c) for c in plan.recv_counts]
        self.num_send, self.num_recv = sum(self.send_splits), sum(self.recv_splits)
        # the distinct sent rows (ascending) and each sent row's position among them: the
        # backward sums a row's gradients from several peers there before adding them in
        sent_rows, send_pos = np.unique(plan.send_index, return_inverse=True)
        self.send_unique = len(sent_rows) == self.num_send
        if self.send_unique:  # the backward adds grad_send as is, rows in send_index order
            sent_rows, send_pos = np.asarray(plan.send_index), np.arange(self.num_send)
        self.sent_rows = torch.from_numpy(np.asarray(sent_rows, dtype=np.int64)).to(device)
        self.send_pos = torch.from_numpy(np.asarray(send_pos, dtype=np.int64)).to(device)
        # rows and bytes this rank sent so far, forward and backward (host-side counts: no sync)
        self.rows_sent = self.bytes_sent = 0

    def to(self, device) -> HaloExchange:
        """Same exchange with its index on ``device``."""
        return HaloExchange(self.plan, self.group, device)

    def start(self, x: torch.Tensor) -> PendingHalo:
        """Start sending the owned rows of ``x [B, n_own, C]`` that peers need."""
        pending = _Pending(self)
        recv, source = _HaloStart.apply(x, self, pending)
        return PendingHalo(recv, source, pending)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Blocking exchange: the halo rows ``[B, n_recv, C]`` of the owned rows ``x``."""
        return self.start(x).wait()


def gather_nodes(x: torch.Tensor, owned: list[np.ndarray], group=None, dim: int = 1):
    """All ranks of ``group`` assemble the full node dimension from every rank's owned rows.

    For evaluation, tests and writing forecasts only (never inside a training step: it moves
    the whole grid). Not differentiable.

    Parameters
    ----------
    x : torch.Tensor
        This rank's rows along ``dim`` (``owned[rank]`` global ids, ascending).
    owned : list of numpy.ndarray
        Global ids owned by every rank of ``group``, index = rank in the group.
    dim : int
        Node dimension of ``x``.

    Returns
    -------
    torch.Tensor
        ``x`` with ``sum(len(o) for o in owned)`` rows along ``dim``, in global order.
    """
    size = max(len(o) for o in owned)
    xt = x.movedim(dim, 0)
    padded = xt.new_zeros((size, *xt.shape[1:]))
    padded[: xt.shape[0]] = xt
    parts = [torch.empty_like(padded) for _ in owned]
    dist.all_gather(parts, padded.contiguous(), group=group)
    total = sum(len(o) for o in owned)
    out = xt.new_empty((total, *xt.shape[1:]))
    for part, ids in zip(parts, owned, strict=True):
        out[torch.from_numpy(ids).to(x.device)] = part[: len(ids)]
    return out.movedim(0, dim)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a (detached) tensor over ``group``, returned as a new tensor."""
    y = x.detach().clone()
    dist.all_reduce(y, group=group)
    return y
