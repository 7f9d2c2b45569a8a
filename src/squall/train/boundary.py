"""Boundary forcing in training and forecasts: the driver's values replace the boundary points.

A limited-area model predicts its interior; its boundary points (the graph spec's band,
:mod:`squall.graphs.boundary`) come from a driving model (:mod:`squall.data.boundary`). Every
state the model sees, the initial ones and each one fed back during a rollout, has the
prognostic variables of its boundary points overwritten with the driver's values at that state's
time (``batch["boundary"]``: ``[B, input_steps + rollout, P, V_prog]``). Forcings (insolation,
orography, ...) stay the dataset's own. The loss and the scores weigh the interior only: cell
areas with the boundary points at zero, scaled so the weights keep mean 1 over the grid (a
loss is then the interior's area-weighted mean).

Lookahead (``data.boundary.lookahead``, on by default)
-----------------------------------------------------
Each state also carries ``V_prog + 1`` extra input columns: on the boundary points the driver's
values one model step after that state's time, and 1 (a boundary flag); zeros elsewhere. So the
step that predicts time ``t + dt`` sees the driver's band at ``t + dt``, as in Neural-LAM
(Oskarsson et al. 2023, boundary forcing over a window that includes the target time) and
regional services, whose global forecast is available before the LAM runs. Without it the band
of the inputs holds nothing the interior's own edge does not (the input band is the truth, or
close to it), so what a forced state adds reaches the model one step late. On lam_alps the
synthetic flow carries air 4.8 degrees per 6 h step across a 13-degree box: every interior point
at 18 h or later holds air that came in through the boundary (profiling/lam_oracle.py).

A model trained with lookahead has ``V_in + V_prog + 1`` input columns per state; its free
rollout (:meth:`BoundaryForcing.unforced`, the forecast's "unforced" curve) overwrites nothing
and puts the state's own band values in the lookahead columns (no driver: the band persists).

The hooks: :class:`squall.train.loop.Trainer` and :class:`squall.train.forecast.Rollout` call
:meth:`BoundaryForcing.force_inputs` on the first state and :meth:`BoundaryForcing.force_next` on
each next one, and weigh errors with :meth:`BoundaryForcing.weights`; a graph without a boundary
has no :class:`BoundaryForcing` and nothing changes (the model's inputs are the dataset's).
"""

from __future__ import annotations

import numpy as np
import torch

from squall.errors import ConfigError


def interior_weights(area: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Cell areas ``[G]`` with the boundary points (``mask``) at zero, scaled to mean 1."""
    keep = torch.as_tensor(~np.asarray(mask), device=area.device)
    if not bool(keep.any()):
        raise ConfigError("every data point is a boundary point: nothing is left to predict")
    w = area.float() * keep
    return w * (w.numel() / w.sum())


class BoundaryForcing:
    """Overwrites the boundary points of model states with the driver's values.

    Parameters
    ----------
    rows : array of int
        ``[P]`` positions of the boundary points in the state's grid axis.
    columns : array of int
        ``[V_prog]`` positions of the prognostic variables in the model's input (the order of
        the driver's values).
    mask : np.ndarray
        ``[G]`` bool, the boundary points of the grid (for :meth:`weights`).
    input_steps : int
        States in a model input.
    device : torch.device
    lookahead : bool
        Append the driver's values one step ahead and the boundary flag to every state.
    forced : bool
        Overwrite the band with the driver (False: the free rollout, see :meth:`unforced`).
    """

    def __init__(self, rows, columns, mask: np.ndarray, input_steps: int, device,
                 lookahead: bool = True, forced: bool = True) -> None:  # fmt: skip
        self.rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=device)
        self.columns = torch.as_tensor(np.asarray(columns), dtype=torch.int64, device=device)
        self.mask = np.asarray(mask, dtype=bool)
        self.input_steps = int(input_steps)
        self.lookahead, self.forced = bool(lookahead), bool(forced)

    @property
    def extra_inputs(self) -> int:
        """Input columns appended to every state (0 without lookahead)."""
        return len(self.columns) + 1 if self.lookahead else 0

    def unforced(self) -> BoundaryForcing:
        """The same model's free rollout: nothing overwritten, the lookahead columns hold the
        state's own band (so a lookahead model gets inputs of its shape and no driver)."""
        import copy

        free = copy.copy(self)
        free.forced = False
        return free

    @classmethod
    def for_dataset(cls, dataset, layout, device) -> BoundaryForcing | None:
        """The forcing of ``dataset``'s driver (None when it has none)."""
        driver = getattr(dataset, "boundary", None)
        if driver is None:
            return None
        if dataset.grid_indices is not None:
            raise ConfigError("boundary forcing with parallel.model_parallel > 1 is not "
                              "supported: train the limited-area model on one rank per "
                              "model group (parallel.model_parallel=1)")  # fmt: skip
        mask = np.zeros(dataset.info.num_grid, dtype=bool)
        mask[driver.rows] = True
        return cls(driver.rows, layout.prognostic_in, mask, dataset.input_steps, device,
                   lookahead=getattr(driver, "lookahead", True))  # fmt: skip

    @staticmethod
    def extra_inputs_for(dataset) -> int:
        """Columns a model on ``dataset`` gets besides the layout's inputs (0 without a driver
        or without lookahead); the model is built with them before the forcing exists."""
        driver = getattr(dataset, "boundary", None)
        if driver is None or not getattr(driver, "lookahead", True):
            return 0
        return len(driver.variables) + 1

    def weights(self, area: torch.Tensor) -> torch.Tensor:
        """Interior weights (:func:`interior_weights`) for errors on the grid of ``area``."""
        return interior_weights(area, self.mask)

    def force(self, state: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``state [B, G, V_in]`` with the boundary rows' prognostic columns set to ``values
        [B, P, V_prog]`` (a new tensor: autograd sees the prediction only in the interior)."""
        values = values.to(device=state.device, dtype=state.dtype)
        rows = state.index_select(1, self.rows).index_copy(-1, self.columns, values)
        return state.index_copy(1, self.rows, rows)

    def _state(self, state: torch.Tensor, batch: dict, time: int) -> torch.Tensor:
        """``state [B, G, V_in]`` at window position ``time``: forced, then with the lookahead
        columns (the driver at ``time + 1``, or the state's own band when unforced)."""
        if self.forced:
            state = self.force(state, _values(batch)[:, time])
        if not self.lookahead:
            return state
        if self.forced:
            ahead = _values(batch)[:, time + 1].to(device=state.device, dtype=state.dtype)
        else:
            ahead = state.index_select(1, self.rows).index_select(-1, self.columns)
        flag = torch.ones(*ahead.shape[:-1], 1, device=state.device, dtype=state.dtype)
        extra = state.new_zeros(state.shape[0], state.shape[1], self.extra_inputs)
        extra = extra.index_copy(1, self.rows, torch.cat([ahead, flag], dim=-1))
        return torch.cat([state, extra], dim=-1)

    def force_inputs(self, state: torch.Tensor, batch: dict) -> torch.Tensor:
        """The first input ``[B, T_in, G, V_in]`` with every input time's boundary forced
        (``[B, T_in, G, V_in + extra_inputs]`` with lookahead)."""
        steps = [self._state(state[:, t], batch, t) for t in range(state.shape[1])]
        return torch.stack(steps, dim=1)

    def force_next(self, state: torch.Tensor, batch: dict, step: int) -> torch.Tensor:
        """The state of rollout step ``step`` (1 = the first prediction's time) ``[B, G, V_in]``
        with the driver's values at that time on its boundary (and the lookahead columns)."""
        return self._state(state, batch, self.input_steps - 1 + step)


def _values(batch: dict) -> torch.Tensor:
    if "boundary" not in batch:
        raise ConfigError("a driven limited-area model needs the driver's values in every batch "
                          "(batch['boundary']); this rollout has none (ensemble members are not "
                          "forced yet: model.ensemble.members=1)")  # fmt: skip
    return batch["boundary"]


class LamEvaluation:
    """A limited-area forecast's scores inside the domain, with and without forcing.

    :meth:`setup` makes the forecast's rollouts score the interior only; when the dataset has a
    driver, the main rollout is forced and a free twin (the same model and steps, nothing forced:
    the plain cut-out) is rolled out from the same starts, :meth:`add` per start.
    """

    def __init__(self, mask: np.ndarray, free=None) -> None:
        self.mask, self.free = mask, free
        self.sums = None

    @classmethod
    def setup(cls, parts, data, roll, *others) -> LamEvaluation | None:
        """Interior weights on ``roll`` (and ``others``, e.g. a reference rollout) and the
        driver's forcing on ``roll``; None when the graph has no boundary."""
        import copy

        mask = parts.graph.boundary_mask()
        if mask is None:
            return None
        for r in (roll, *others):
            if r is not None:
                r.area = interior_weights(r.area, mask)
        roll.boundary = BoundaryForcing.for_dataset(data, parts.layout, roll.device)
        free = None
        if roll.boundary is not None:
            free = copy.copy(roll)
            free.boundary = roll.boundary.unforced()
        return cls(mask, free)

    def add(self, x: torch.Tensor, y: torch.Tensor, members: int = 1,
            boundary: torch.Tensor | None = None) -> None:  # fmt: skip
        """Roll the free twin out from one start and add its MSE per step and variable
        (``boundary``: the start's driver values, passed along but never read)."""
        if self.free is None:
            return
        mse = self.free.run(x, y, None, members, boundary)["mse"]
        self.sums = mse if self.sums is None else self.sums + mse

    def result(self, starts: int, world: int = 1, like: torch.Tensor | None = None) -> dict:
        """``boundary_points``, ``forced`` and, when forced, ``rmse_model_unforced`` per lead
        time (normalised units, interior, mean over the prognostic variables), summed over the
        ``world`` ranks (``like``: the ``[steps, P]`` shape for a rank that ran no start)."""
        out = {"boundary_points": int(self.mask.sum()), "forced": self.free is not None}
        if self.free is not None:
            sums = self.sums.clone() if self.sums is not None else torch.zeros_like(like)
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(sums)
            mse = sums.cpu().numpy() / starts
            out["rmse_model_unforced"] = np.sqrt(mse.mean(axis=1)).tolist()
        return out


def format_lam(result: dict) -> str:
    """The forecast table's lines for a limited-area model (see :meth:`LamEvaluation.result`)."""
    n = result["boundary_points"]
    if not result.get("forced"):
        return (f"limited area: scored inside the domain ({n:,} boundary points left out), "
                "not forced (data.boundary.enabled=false)")  # fmt: skip
    lines = [f"limited area: scored inside the domain ({n:,} boundary points forced by the "
             "driver and left out); RMSE, normalised units, of the forced rollout, of the same "
             "model rolled out unforced (nothing overwritten) and of persistence; gain: 1 - "
             "forced / unforced:",
             f"{'lead h':>7}{'forced':>10}{'unforced':>10}{'persist':>10}{'gain':>8}"]  # fmt: skip
    for h, m, u, p in zip(result["lead_hours"], result["rmse_model"],
                          result["rmse_model_unforced"], result["rmse_persistence"], strict=True):  # fmt: skip
        lines.append(f"{h:>7.0f}{m:>10.4f}{u:>10.4f}{p:>10.4f}{1 - m / u:>8.1%}")
    return "\n".join(lines)
