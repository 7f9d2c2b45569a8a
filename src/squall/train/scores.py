"""Proper scores of an ensemble forecast: almost-fair CRPS, fair CRPS, energy score, spread/skill.

Shapes follow :func:`squall.train.loop.area_weighted_mse`, with a member axis:
``ensemble [B, M, G, V]`` (batch, members, grid points, variables), ``truth [B, G, V]``,
``area [G]`` normalised to mean 1. Every score is computed in fp32 and averaged over batch, grid
points (area-weighted) and variables, so a loss and its logged value mean the same thing.

The member pair sums ``sum_j sum_k |x_j - x_k|`` use the sorted members,
``sum_{j,k} |x_j - x_k| = 2 sum_i (2i - M + 1) x_(i)`` (``x_(0) <= ... <= x_(M-1)``): O(M log M)
work and memory instead of O(M^2), with gradients through the sort's gather.
"""

from __future__ import annotations

import torch

__all__ = [
    "afcrps",
    "afcrps_pointwise",
    "energy_score",
    "fair_crps",
    "spread_skill",
]


def _check(ensemble: torch.Tensor, truth: torch.Tensor, area: torch.Tensor, min_members: int = 2):
    if ensemble.dim() != 4 or truth.dim() != 3:
        raise ValueError(f"ensemble must be [B, M, G, V] and truth [B, G, V]; got "
                         f"{tuple(ensemble.shape)} and {tuple(truth.shape)}")
    b, m, g, v = ensemble.shape
    if truth.shape != (b, g, v):
        raise ValueError(f"truth {tuple(truth.shape)} does not match ensemble "
                         f"{tuple(ensemble.shape)} without its member axis (expected {(b, g, v)})")
    if area.shape != (g,):
        raise ValueError(f"area must be [G] = [{g}]; got {tuple(area.shape)}")
    if m < min_members:
        raise ValueError(f"this score needs at least {min_members} ensemble members; got {m}")


def _pair_sum(ensemble: torch.Tensor) -> torch.Tensor:
    """``sum_j sum_k |x_j - x_k|`` over the member axis (dim 1), ``[B, M, G, V] -> [B, G, V]``."""
    m = ensemble.shape[1]
    ordered = ensemble.sort(dim=1).values
    rank_weight = 2 * torch.arange(m, device=ensemble.device, dtype=ensemble.dtype) - (m - 1)
    return 2 * (ordered * rank_weight.view(1, m, 1, 1)).sum(dim=1)


def afcrps_pointwise(ensemble: torch.Tensor, truth: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    r"""Almost-fair CRPS at every point, ``[B, M, G, V], [B, G, V] -> [B, G, V]``.

    .. math::

        \mathrm{afCRPS}_\alpha = \frac{1}{2M(M-1)} \sum_{j} \sum_{k \ne j}
            \left( |x_j - y| + |x_k - y| - (1 - \epsilon) |x_j - x_k| \right),
        \qquad \epsilon = \frac{1 - \alpha}{M}

    (Lang et al. 2024, arXiv:2412.15832), which equals
    :math:`\frac{1}{M}\sum_j |x_j - y| - \frac{1 - \epsilon}{2M(M-1)} \sum_{j,k} |x_j - x_k|`.
    ``alpha = 1`` is the fair CRPS (unbiased for the CRPS of the distribution the members are
    drawn from); ``alpha = 0`` is the CRPS of the empirical distribution of the members.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"afCRPS alpha must lie in [0, 1]; got {alpha}")
    m = ensemble.shape[1]
    if m < 2:
        raise ValueError(f"afCRPS needs at least 2 ensemble members; got {m}")
    x, y = ensemble.float(), truth.float()
    skill = (x - y.unsqueeze(1)).abs().mean(dim=1)
    eps = (1.0 - alpha) / m
    return skill - (1.0 - eps) / (2 * m * (m - 1)) * _pair_sum(x)


def afcrps(ensemble: torch.Tensor, truth: torch.Tensor, area: torch.Tensor,
           alpha: float = 0.95) -> torch.Tensor:
    """Area-weighted mean almost-fair CRPS (see :func:`afcrps_pointwise`); the ensemble loss.

    ``alpha = 0.95`` is the value AIFS-CRPS trains with (arXiv:2412.15832, section 2.3).
    """
    _check(ensemble, truth, area)
    return (afcrps_pointwise(ensemble, truth, alpha) * area.float()[None, :, None]).mean()


def fair_crps(ensemble: torch.Tensor, truth: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Area-weighted mean fair CRPS: :func:`afcrps` with ``alpha = 1``."""
    return afcrps(ensemble, truth, area, alpha=1.0)


def energy_score(ensemble: torch.Tensor, truth: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    r"""Fair energy score of each variable's whole field, averaged over batch and variables.

    .. math::

        \mathrm{ES} = \frac{1}{M} \sum_j \lVert x_j - y \rVert
            - \frac{1}{2M(M-1)} \sum_{j} \sum_{k} \lVert x_j - x_k \rVert,
        \qquad \lVert z \rVert^2 = \frac{1}{G} \sum_g a_g z_g^2

    with the area weights ``a`` (mean 1), so the norm is an area-weighted RMS. Unlike the CRPS it
    scores the joint distribution of the grid points (spatial structure), at O(M^2 G) cost.
    """
    _check(ensemble, truth, area)
    b, m, g, v = ensemble.shape
    w = area.float().sqrt()[None, None, :, None] / g**0.5
    x = (ensemble.float() * w).permute(0, 3, 1, 2)  # [B, V, M, G]
    y = (truth.float().unsqueeze(1) * w).permute(0, 3, 1, 2)  # [B, V, 1, G]
    skill = torch.linalg.vector_norm(x - y, dim=-1).mean(dim=-1)  # [B, V]
    diff = x.unsqueeze(2) - x.unsqueeze(3)  # [B, V, M, M, G]
    spread = torch.linalg.vector_norm(diff, dim=-1).sum(dim=(-1, -2))
    return (skill - spread / (2 * m * (m - 1))).mean()


def spread_skill(ensemble: torch.Tensor, truth: torch.Tensor,
                 area: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ensemble-mean RMSE, spread and their ratio, area-weighted over the grid, per variable.

    ``spread`` is the square root of the area-weighted mean of the unbiased member variance;
    ``ratio = sqrt((M + 1) / M) * spread / rmse``, which is 1 in expectation for an ensemble whose
    members and the truth are exchangeable draws (Fortin et al. 2014). Returns ``[V]`` tensors
    (averaged over the batch in squared units before the root).
    """
    _check(ensemble, truth, area)
    m = ensemble.shape[1]
    a = area.float()[None, :, None]
    x, y = ensemble.float(), truth.float()
    mse = ((x.mean(dim=1) - y).square() * a).mean(dim=(0, 1))
    var = (x.var(dim=1, unbiased=True) * a).mean(dim=(0, 1))
    rmse, spread = mse.sqrt(), var.sqrt()
    return {"rmse": rmse, "spread": spread, "ratio": ((m + 1) / m) ** 0.5 * spread / rmse}
