"""Ensemble parallelism: the members of each sample spread over the ranks of an ensemble group.

An ensemble group of ``E`` ranks trains one set of samples with ``M`` members per sample; rank
``r`` of the group holds members ``r * M / E .. (r + 1) * M / E - 1`` (``M / E`` per rank, several
per GPU when they fit), folded into its batch as on one process. Three things make the group
train exactly what one process holding all ``M`` members trains:

1. **Noise** (:class:`SharedNoise`): every rank draws the noise of *all* members from a generator
   seeded alike on every rank and keeps its own members' rows, so member ``m`` gets the same noise
   whatever the layout (the noise is ``K`` channels per mesh node: cheap to draw whole).
2. **Members for the loss** (:func:`gather_members`): the local members ``[B, M / E, G, V]`` are
   all-gathered into ``[B, M, G, V]`` in rank order; every rank then computes the same score. The
   backward keeps the gradient of the rank's own members (each rank's copy of the score has the
   same gradient, so no communication is needed).
3. **Gradients** (:func:`sum_gradients_over`): each rank's parameter gradients hold its own
   members' part of ``dL/dtheta``; the group's sum, all-reduced as each gradient is accumulated,
   is the whole-ensemble gradient on every rank, before clipping and the optimiser step.

Data parallelism (replicas that each take other samples) sits on top: across replicas, gradients
are averaged as for a deterministic model.

:func:`apply_ensemble_parallel` applies the three to a model and is the one call a layout with an
ensemble axis makes, after the model is built and before its optimiser steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["SharedNoise", "apply_ensemble_parallel", "gather_members", "member_slice",
           "sum_gradients_over"]


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


class SharedNoise:
    """The noise of ``total`` members per sample from a generator seeded alike on every rank;
    returns the rows of members ``first .. first + local - 1`` of each sample.

    Installed as ``model.noise_source``: called with the folded batch size ``B * local``.
    """

    def __init__(self, model, seed: int, total: int, first: int, local: int):
        if not 0 <= first < first + local <= total:
            raise ValueError(f"members {first}..{first + local - 1} are not among {total}")
        device = model.graph.mesh_attrs.device
        self.generator = torch.Generator(device=device).manual_seed(int(seed))
        self.model, self.total, self.first, self.local = model, total, first, local

    def __call__(self, rows: int) -> torch.Tensor:
        if rows % self.local:
            raise ValueError(f"{rows} batch rows are not a whole number of samples of "
                             f"{self.local} members")  # fmt: skip
        batch = rows // self.local
        noise = self.model.sample_noise(batch * self.total, self.generator)
        noise = noise.unflatten(0, (batch, self.total))[:, self.first : self.first + self.local]
        return noise.flatten(0, 1)


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


def sum_gradients_over(model: torch.nn.Module, group) -> list:
    """Sum every parameter's gradient over ``group`` as soon as backward has accumulated it
    (synchronous all-reduces in the backward's order, which every rank shares). Returns the hook
    handles."""
    if group is None or dist.get_world_size(group) == 1:
        return []

    def hook(param: torch.Tensor) -> None:
        dist.all_reduce(param.grad, group=group)

    return [p.register_post_accumulate_grad_hook(hook)
            for p in model.parameters() if p.requires_grad]  # fmt: skip


def apply_ensemble_parallel(model, group, seed: int) -> None:
    """Spread ``model``'s ``model.members`` members over the ranks of ``group`` (in place).

    Installs :class:`SharedNoise` as ``model.noise_source``, a member gather for the loss
    (``model.member_gather``, read by :func:`squall.train.ensemble.loss_function`) and the
    gradient sum over the group. ``group=None`` or a group of one rank keeps all members here but
    still draws the noise as :class:`SharedNoise` does, so one process matches any layout.

    Raises
    ------
    ValueError
        If the members do not divide over the group's ranks.
    """
    size = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    first, local = member_slice(model.members, size, rank)
    model.noise_source = SharedNoise(model, seed, model.members, first, local)
    model.local_members = local
    model.member_gather = None if size == 1 else (lambda t: gather_members(t, group))
    model.ensemble_hooks = sum_gradients_over(model, group)
