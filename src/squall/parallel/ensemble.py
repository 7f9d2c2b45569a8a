"""Ensemble parallelism: the members of each sample spread over the ranks of an ensemble group.

An ensemble group of ``E`` ranks (:class:`squall.distributed.layout.Layout`'s ``ensemble``
axis) trains one set of samples with ``M`` members per sample; rank ``e`` of the group holds
members ``e * M / E .. (e + 1) * M / E - 1`` (``M / E`` per rank, several per GPU when they
fit), folded into its batch as on one process. :func:`squall.parallel.parallelize.parallelize`
applies it (:func:`apply_ensemble_parallel`), and three things make the group train exactly
what one process holding all ``M`` members trains:

1. **Noise** (:class:`SharedNoise`): the noise of member ``m`` of global sample ``s`` at the
   ``c``-th forward is drawn from a generator seeded by ``(seed, c, s)`` over the whole mesh,
   then cut to this rank's members and mesh rows. It is the same whatever the ensemble,
   model-parallel or data-parallel layout (the noise is ``K`` channels per mesh node: cheap to
   draw whole).
2. **Members for the loss** (:func:`gather_members`): the local members ``[B, M / E, G, V]`` are
   all-gathered over the ensemble group into ``[B, M, G, V]`` in rank order; every rank of the
   group then computes the same score. The backward keeps the gradient of the rank's own
   members (each rank's copy of the score has the same gradient, so nothing is sent).
3. **Gradients**: each rank's parameter gradients hold its own members' (and, with model
   parallelism, its own graph part's) share of ``dL/dtheta``: ``parallelize`` sums them over
   the ensemble and model groups and averages over data-parallel replicas (one all-reduce over
   the world, :class:`squall.parallel.parallelize.GradReducer`, or FSDP's reduce-scatter).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SharedNoise", "apply_ensemble_parallel", "gather_members", "member_slice"]


def member_slice(members: int, size: int, rank: int) -> tuple[int, int]:
    """``(first, count)`` of the members rank ``rank`` of an ensemble group of ``size`` holds.

    Raises
    ------
    ValueError
        If the members do not divide over the group's ranks.
    """
    if members % size:
        raise ValueError(f"model.ensemble.members={members} does not divide over an ensemble "
                         f"group of {size} ranks")  # fmt: skip
    local = members // size
    return rank * local, local


def noise_seed(seed: int, call: int, sample: int) -> int:
    """The generator seed of global sample ``sample`` at forward ``call`` (63 bits, from
    :class:`numpy.random.SeedSequence`: distinct keys give independent streams)."""
    words = np.random.SeedSequence([int(seed), int(call), int(sample)]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


class SharedNoise:
    """Noise of the members ``first .. first + local - 1`` of each sample, identical to what one
    process holding all ``total`` members and every sample draws.

    Installed as ``model.noise_source`` and called once per forward with the folded batch rows
    ``B * local``; sample ``b`` of the batch is global sample ``data_rank * B + b`` (the
    data-parallel replicas read consecutive blocks of a global batch). On a sharded graph the
    rows of this rank's mesh nodes (``model.graph.mesh_ids``) are kept.

    Attributes
    ----------
    calls : int
        Forwards so far (every rank of a run calls the model equally often).
    """

    def __init__(self, model, seed: int, total: int, first: int, local: int, data_rank: int = 0):
        if not 0 <= first < first + local <= total:
            raise ValueError(f"members {first}..{first + local - 1} are not among {total}")
        self.model, self.seed, self.total, self.first, self.local = model, seed, total, first, local
        self.data_rank, self.calls = data_rank, 0
        self._generator = None

    def __call__(self, rows: int) -> torch.Tensor:
        # rows that are not whole samples of this rank's members (a single-member validation
        # rollout) are samples of one member each
        total, first, local = ((self.total, self.first, self.local) if rows % self.local == 0
                               else (1, 0, 1))  # fmt: skip
        model, batch = self.model, rows // local
        device = model.graph.mesh_attrs.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        mesh_ids = getattr(model.graph, "mesh_ids", None)
        keep = None if mesh_ids is None else torch.as_tensor(mesh_ids, device=device)
        shape = (total, model.sizes["mesh"], model.cfg.noise_channels)
        parts = []
        for b in range(batch):
            self._generator.manual_seed(noise_seed(self.seed, self.calls,
                                                   self.data_rank * batch + b))  # fmt: skip
            noise = torch.randn(shape, generator=self._generator, device=device)
            noise = noise[first : first + local]
            parts.append(noise if keep is None else noise.index_select(1, keep))
        self.calls += 1
        return torch.cat(parts)


class _GatherMembers(torch.autograd.Function):
    """Forward: all-gather ``[B, m, ...]`` from every rank of ``group``, concatenated along the
    member axis in rank order. Backward: the slice of this rank's members (every rank computes
    the same loss from the gathered tensor, so the slice is this rank's whole gradient; nothing
    is sent)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        size = dist.get_world_size(group)
        ctx.rank, ctx.local = dist.get_rank(group), local.shape[1]
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.rank * ctx.local
        return grad.narrow(1, start, ctx.local), None


def gather_members(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every member of the ensemble group, ``[B, m, G, V] -> [B, m * E, G, V]`` (with autograd)."""
    if group is None or dist.get_world_size(group) == 1:
        return local
    return _GatherMembers.apply(local, group)


class MemberGather:
    """``model.member_gather``: :func:`gather_members` over the ensemble group, counting the time
    spent in it (``seconds``, host wall time; reset by the reader)."""

    def __init__(self, group):
        self.group, self.seconds, self.calls = group, 0.0, 0

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        import time

        start = time.perf_counter()
        out = gather_members(local, self.group)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def apply_ensemble_parallel(model, group, seed: int, data_rank: int = 0) -> None:
    """Give ``model`` its share of the ``model.members`` members over the ranks of ``group``
    (in place; called by :func:`squall.parallel.parallelize.parallelize`, which also reduces
    the gradients).

    Installs :class:`SharedNoise` as ``model.noise_source``, the number of members held here as
    ``model.local_members`` and a :class:`MemberGather` for the loss as ``model.member_gather``
    (read by :func:`squall.train.ensemble.loss_function`; ``None`` on a group of one).
    ``group=None`` keeps all members here and still draws the noise as :class:`SharedNoise`
    does, so one process matches any layout.

    Raises
    ------
    ValueError
        If the members do not divide over the group's ranks.
    """
    size = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    first, local = member_slice(model.members, size, rank)
    model.noise_source = SharedNoise(model, seed, model.members, first, local, data_rank)
    model.local_members = local
    model.member_gather = None if size == 1 else MemberGather(group)
