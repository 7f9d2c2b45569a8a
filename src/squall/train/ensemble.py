"""Training an ensemble: members folded into the batch, a proper score over them as the loss.

A stochastic :class:`~squall.models.forecaster.GraphForecaster` (``model.ensemble.noise_channels
> 0``) is trained on ``M = model.ensemble.members`` members per sample: each sample's input is
repeated ``M`` times along the batch (member-fastest, ``[B * M, ...]``), the members differ only by
the noise the model draws at every step, and the rollout feeds each member its own prediction.
At every rollout step the ``M`` predictions of a sample are scored against its truth with
``model.ensemble.loss`` (:mod:`squall.train.scores`):

* ``afcrps``: almost-fair CRPS with ``model.ensemble.alpha`` (AIFS-CRPS's loss, alpha = 0.95);
* ``fair_crps``: the fair CRPS (alpha = 1);
* ``energy``: the fair energy score of each variable's field.

The loss is the mean over rollout steps, like the deterministic MSE it replaces.
:class:`squall.train.loop.Trainer` takes it through :func:`loss_function`.
"""

from __future__ import annotations

from functools import partial

import torch

from squall.train import scores

#: ``model.ensemble.loss`` -> score ``(ensemble [B, M, G, V], truth [B, G, V], area [G])``.
SCORES = {"afcrps": scores.afcrps, "fair_crps": scores.fair_crps, "energy": scores.energy_score}


def fold_members(tensor: torch.Tensor, members: int) -> torch.Tensor:
    """``[B, ...] -> [B * members, ...]``, each sample repeated ``members`` times in a row."""
    return tensor.repeat_interleave(members, dim=0)


def unfold_members(tensor: torch.Tensor, members: int) -> torch.Tensor:
    """``[B * members, ...] -> [B, members, ...]``: the inverse of :func:`fold_members`."""
    return tensor.reshape(tensor.shape[0] // members, members, *tensor.shape[1:])


def score_of(name: str, alpha: float = 0.95):
    """The score ``model.ensemble.loss`` names, alpha bound for ``afcrps``."""
    if name not in SCORES:
        raise ValueError(f"ensemble loss {name!r}: choose one of {', '.join(SCORES)}")
    return partial(scores.afcrps, alpha=alpha) if name == "afcrps" else SCORES[name]


def ensemble_rollout_loss(trainer, batch: dict, score) -> torch.Tensor:
    """Mean over the rollout steps of ``score`` of the members of every sample.

    ``trainer.rollout`` runs the folded batch (``[B * m]`` rows, ``m`` the members held here:
    all of them, or this rank's share when :func:`squall.parallel.ensemble.
    apply_ensemble_parallel` spread them over an ensemble group, whose ``model.member_gather``
    then brings every member to the score); the truth of a sample is the same in each of its
    rows, so the first row of each sample is scored against.
    """
    model = trainer.model
    members = int(getattr(model, "local_members", model.members))
    gather = getattr(model, "member_gather", None) or (lambda t: t)
    folded = {"x": fold_members(batch["x"], members), "y": fold_members(batch["y"], members)}
    area = model.graph.area
    losses = [score(gather(unfold_members(pred, members)), truth[::members], area)
              for pred, truth in trainer.rollout(folded)]  # fmt: skip
    return sum(losses) / len(losses)


def loss_function(model):
    """``loss(trainer, batch) -> scalar`` for an ensemble model with more than one member, else
    None (the trainer's area-weighted MSE)."""
    cfg = getattr(model, "cfg", None)
    members = int(getattr(cfg, "ensemble_members", 1))
    if members <= 1:
        return None
    score = score_of(str(cfg.ensemble_loss), float(cfg.crps_alpha))
    return partial(ensemble_rollout_loss, score=score)
