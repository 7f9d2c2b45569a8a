"""The training loop: AdamW, warm-up + cosine schedule, area-weighted MSE with optional rollout,
gradient clipping, bf16 autocast on GPU, validation against persistence, checkpoint and resume.

SIGTERM or SIGUSR1 during :meth:`Trainer.fit` finishes the step, writes a checkpoint and returns
with ``stopped_early`` (see :mod:`squall.train.signals`).

This is the only step loop: ``jobs.train`` runs it to ``training.max_steps``, a scaling point
(:mod:`squall.scaling.point`) runs it for its warm-up and timed steps and adds its own checkpoint
state and end-of-run bookkeeping through :class:`TrainerHooks`. What a step's time includes is
written once, in :mod:`squall.tracking.metrics`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass

import torch

from squall.config import LOSS_WEIGHTS
from squall.errors import ConfigError, DataError, SquallError
from squall.parallel.sharding import is_sharded
from squall.parallel.state import save_sharded
from squall.progress import Progress
from squall.tracking import metrics as M
from squall.tracking.metrics import StepTimer, peak_memory
from squall.train import ensemble, signals
from squall.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

LOSS_VAL_PROGNOSTIC = M.LOSS_VAL_PROGNOSTIC
LOSS_VAL_PERSISTENCE = M.LOSS_VAL_PERSISTENCE
SKILL_VS_PERSISTENCE = M.SKILL_VS_PERSISTENCE
VALIDATION_METRICS = M.VALIDATION_METRICS


class TrainingDiverged(SquallError, FloatingPointError):
    """The loss became NaN or infinite on finite data."""


@dataclass(frozen=True)
class VariableLayout:
    """Where each variable goes, as column indices into the dataset's variable order.

    ``inputs`` = prognostic + forcing columns (model input order), ``outputs`` = prognostic +
    diagnostic columns (model output order). ``residual`` pairs (output position, input position)
    of every prognostic variable; ``prognostic_in`` / ``prognostic_out`` are their positions.
    """

    inputs: list[int]
    outputs: list[int]
    prognostic_in: list[int]
    prognostic_out: list[int]

    @classmethod
    def from_roles(cls, roles: dict[str, list[int]]) -> VariableLayout:
        inputs = sorted(roles["prognostic"] + roles["forcing"])
        outputs = sorted(roles["prognostic"] + roles["diagnostic"])
        prog = roles["prognostic"]
        return cls(
            inputs, outputs, [inputs.index(i) for i in prog], [outputs.index(i) for i in prog]
        )

    @property
    def residual(self) -> list[tuple[int, int]]:
        return list(zip(self.prognostic_out, self.prognostic_in, strict=True))


def area_weighted_mse(pred: torch.Tensor, target: torch.Tensor, area: torch.Tensor,
                      var_weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean over batch, variables and grid points of the squared error, weighted by cell area
    (and by ``var_weight [V]`` per variable when given).

    ``pred, target [B, G, V]``; ``area [G]`` normalised to mean 1. Computed in fp32.
    """
    err = (pred.float() - target.float()).square()
    if var_weight is not None:
        err = err * var_weight.float()
    return (err * area.float()[None, :, None]).mean()


def variable_weights(output_scale: torch.Tensor, kind: str) -> torch.Tensor | None:
    """Per-output loss weights ``[V]`` (mean 1), or None for the plain normalised MSE.

    ``state``: every output's error in its own normalised units (None). ``tendency``: each
    output's squared error divided by its one-step change's variance (``output_scale``, the
    model's tendency spread; 1 for diagnostics), as GraphCast weighs its loss (Lam et al. 2023):
    a variable that changes little per step (a slowly advected field) counts as much as one with
    a large predictable cycle, whose error would otherwise fill the loss.
    """
    if kind == "state":
        return None
    if kind != "tendency":
        raise ConfigError(
            f"training.loss_weights={kind!r}: choose one of {', '.join(LOSS_WEIGHTS)}"
        )
    # floor: a variable whose one-step change is below 1e-3 of its spread is held constant by the
    # data, and its weight must not swamp the others
    w = 1.0 / output_scale.float().clamp_min(1e-3).square()
    return w / w.mean()


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class TrainerHooks:
    """What a caller adds to :meth:`Trainer.fit` without a loop of its own; every method runs on
    every rank. The default does nothing."""

    def state_dict(self) -> dict:
        """Extra state written into each checkpoint (``extra["hooks"]``)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` from the checkpoint a run resumes from."""

    def on_fit_end(self, trainer: Trainer, signum: int) -> None:
        """After the last step, before the final checkpoint: ``signum`` is the stop signal every
        rank agreed on (0 when the run reached its step budget)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Train ``model`` on windows from ``loader`` with the settings of ``cfg`` (``conf/training``).

    In a distributed run, ``wrapped`` is the module the forward goes through (DDP) while ``model``
    holds the state that is checkpointed; ``reduce`` turns a rank's loss share into the global
    value for logging (sum over the model group, mean over replicas); only ``is_main`` writes
    checkpoints; ``agree(signum) -> signum`` returns the stop signal any rank received (0 for
    none), so every rank stops at the same step; ``replicas`` data-parallel replicas each take a
    batch per step (throughput counts all of them).

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``[B, T_in, G, V_in]`` to ``[B, G, V_out]``; has ``model.graph.area``.
    layout : VariableLayout
        Which dataset columns are inputs and outputs.
    cfg : DictConfig or namespace
        ``conf/training`` settings.
    device : torch.device
    logger : object with ``log_metrics(dict, step)``
    hooks : TrainerHooks, optional
        Extra checkpoint state and end-of-run bookkeeping (a scaling point's).
    """

    def __init__(self, model, layout: VariableLayout, cfg, device, logger, checkpoint_path=None,
                 wrapped=None, reduce=None, is_main=True, agree=None, barrier=None, replicas=1,
                 hooks: TrainerHooks | None = None):  # fmt: skip
        self.model, self.layout, self.cfg, self.device, self.logger = (
            model,
            layout,
            cfg,
            device,
            logger,
        )
        self.checkpoint_path = checkpoint_path
        self.net = wrapped if wrapped is not None else model
        self.reduce = reduce or (lambda t: t.detach())
        self.is_main, self.agree = is_main, agree or (lambda signum: signum)
        self.barrier = barrier or (lambda: None)
        self.replicas = int(replicas)
        self.hooks = hooks or TrainerHooks()
        # an ensemble model's score over its members (squall.train.ensemble), else None: MSE
        self.loss_fn = ensemble.loss_function(model)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay), betas=(0.9, 0.95),
            **({"fused": True} if fused else {"foreach": True}),
        )  # fmt: skip
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_lambda(int(cfg.warmup_steps), int(cfg.max_steps), float(cfg.min_lr_ratio)),
        )
        precision = str(cfg.precision)
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16"
        self.step, self.samples_seen = 0, 0
        self.inputs = torch.tensor(layout.inputs, device=device)
        self.outputs = torch.tensor(layout.outputs, device=device)
        self.prog_in = torch.tensor(layout.prognostic_in, device=device)
        self.prog_out = torch.tensor(layout.prognostic_out, device=device)
        self.boundary = None  # squall.train.boundary.BoundaryForcing, set by build_run
        kind = str(getattr(cfg, "loss_weights", None) or "state")
        self.var_weight = variable_weights(model.output_scale.to(device), kind)
        self.stop_requested = False
        self.stopped_by: str | None = None
        self.stop_signum = 0
        # Step times of the last fit() (warm-up excluded), and the waits for their batches.
        self.timer = StepTimer(sync=lambda: None)
        self.data_waits: list[float] = []
        self._peaks: dict[str, float] = {}

    # -- maths ----------------------------------------------------------------------------------

    def rollout(self, batch: dict):
        """Yield ``(prediction, truth)`` ``[B, G, V_out]`` for each of ``rollout`` autoregressive
        steps; later steps start from earlier predictions (forcings from the data)."""
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch["y"].to(self.device, non_blocking=True)
        state = x.index_select(-1, self.inputs)
        if self.boundary is not None:  # a driven limited-area model (squall.train.boundary)
            state = self.boundary.force_inputs(state, batch)
        obs = batch.get("obs")  # one ObsBatch per step (squall.data.observations)
        for r in range(y.shape[1]):
            extra = {} if obs is None else {"obs": obs[r].to(self.device, non_blocking=True)}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.net(state, **extra)
            truth = y[:, r]
            yield pred, truth.index_select(-1, self.outputs)
            if r + 1 < y.shape[1]:
                nxt = truth.index_select(-1, self.inputs)
                nxt = nxt.index_copy(
                    -1, self.prog_in, pred.index_select(-1, self.prog_out).to(nxt.dtype)
                )
                if self.boundary is not None:
                    nxt = self.boundary.force_next(nxt, batch, r + 1)
                state = torch.cat([state[:, 1:], nxt.unsqueeze(1)], dim=1)

    def loss_area(self) -> torch.Tensor:
        """Cell areas weighing errors: the interior only for a driven limited-area model."""
        area = self.model.graph.area
        return area if self.boundary is None else self.boundary.weights(area)

    def rollout_loss(self, batch: dict) -> torch.Tensor:
        """Mean area-weighted MSE over the rollout steps (normalised space); an ensemble's
        score over its members instead when :attr:`loss_fn` is set."""
        if self.loss_fn is not None:
            return self.loss_fn(self, batch)
        area = self.loss_area()
        losses = [area_weighted_mse(pred, truth, area, self.var_weight)
                  for pred, truth in self.rollout(batch)]  # fmt: skip
        return sum(losses) / len(losses)

    # -- loop -----------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> float:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.rollout_loss(batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), float(self.cfg.grad_clip)
        )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.samples_seen += batch["x"].shape[0]
        return loss.detach(), grad_norm.detach()

    def global_loss(self, loss: torch.Tensor) -> float:
        """A step's loss for the whole model group and its replicas, as a float (the step's one
        host sync: the value is logged anyway); raises on a non-finite loss."""
        value = float(self.reduce(loss))
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss became {value} at step {self.step}: training diverged; lower training.lr "
                f"({float(self.cfg.lr):g}) or training.grad_clip ({float(self.cfg.grad_clip):g})"
            )
        return value

    @torch.no_grad()
    def validate(self, loader, max_batches: int) -> dict:
        """Validation loss, and the prognostic variables' error against persistence (repeating
        the last input state over the rollout): ``skill = 1 - model / persistence``."""
        self.net.eval()
        area = self.loss_area()
        sums = torch.zeros(
            3, dtype=torch.float64, device=self.device
        )  # total, prognostic, persistence
        batches = 0
        for batch in loader:
            if batches >= max_batches:
                break
            last = (
                batch["x"][:, -1].to(self.device).index_select(-1, self.inputs)[..., self.prog_in]
            )
            steps = list(self.rollout(batch))
            for pred, truth in steps:
                sums += torch.stack([
                    area_weighted_mse(pred, truth, area),
                    area_weighted_mse(pred[..., self.prog_out], truth[..., self.prog_out], area),
                    area_weighted_mse(last, truth[..., self.prog_out], area),
                ]).double() / len(steps)  # fmt: skip
            batches += 1
        total, prog, base = (self.reduce(sums) / batches).tolist()  # this rank's shares -> global
        return {M.LOSS_VAL: total, LOSS_VAL_PROGNOSTIC: prog, LOSS_VAL_PERSISTENCE: base,
                SKILL_VS_PERSISTENCE: 1 - prog / base}  # fmt: skip

    def save(self):
        """Rank 0 writes (parameters are identical on every rank); the others wait for it.

        The checkpoint names the MLflow run it belongs to, so a resumed job continues that run,
        and holds the hooks' state.
        """
        sharded = is_sharded(self.model)  # every rank writes its shards
        if self.checkpoint_path is not None and (self.is_main or sharded):
            run_id = getattr(self.logger, "run_id", None)
            extra = {} if run_id is None else {
                "mlflow_run_id": run_id, "tracking_uri": getattr(self.logger, "tracking_uri", None)
            }  # fmt: skip
            hooks = self.hooks.state_dict()
            if hooks:
                extra["hooks"] = hooks
            save = save_sharded if sharded else save_checkpoint
            save(self.checkpoint_path, self.model, self.optimizer, self.scheduler,
                 self.step, self.samples_seen, extra)  # fmt: skip
        self.barrier()

    def resume(self) -> bool:
        """Continue from ``checkpoint_path`` when it exists: states, step, data position, RNG and
        the hooks' state. Returns whether there was a checkpoint."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        payload = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler)
        self.step, self.samples_seen = payload["step"], payload["samples_seen"]
        self.hooks.load_state_dict(payload.get("extra", {}).get("hooks", {}))
        log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    def _peak_memory(self) -> dict[str, float]:
        """This logging window's peak memory (then reset); the run's largest kept for the end."""
        window = peak_memory(reset=True)
        for key, value in window.items():
            self._peaks[key] = max(value, self._peaks.get(key, 0.0))
        return window

    def fit(self, make_train_loader, val_loader=None, max_steps: int | None = None) -> dict:
        """Train up to step ``max_steps`` (``training.max_steps`` by default); return a summary.

        ``make_train_loader(samples_seen)`` builds a loader starting at the data position (after
        a resume). The first ``training.timing_warmup_steps`` steps of this call are left out of
        the timing (``time/step_s`` and the rest of :meth:`StepTimer.stats`, ``time/data_s``);
        every step logs its own ``time/last_step_s`` with ``time/timed`` saying which it is.

        Returns
        -------
        dict
            ``step``, ``stopped_early``, ``stopped_by`` (signal name or None), ``losses`` (this
            call's global training losses, one per step), ``peak_memory`` (this rank's largest
            window, by metric name), the last validation metrics and the timing metrics.
        """
        cfg = self.cfg
        max_steps = int(cfg.max_steps) if max_steps is None else int(max_steps)
        if self.step >= max_steps:
            log.warning("the checkpoint is at step %d >= max_steps=%d: nothing to train (raise "
                        "training.max_steps, or training.resume=false to start over, which "
                        "replaces the checkpoint)", self.step, max_steps)  # fmt: skip
        # The job's own stop handler when it installed one (it covers start-up too), else one
        # for the duration of this call.
        stop = signals.active()
        local = signals.StopSignals(immediate=False) if stop is None else None
        if local is not None:
            stop = local.__enter__()
        stop.training_started()
        bar = Progress(max_steps, "training", unit="step") if self.is_main else None
        warmup = min(int(cfg.get("timing_warmup_steps", 5)), max(0, max_steps - self.step - 1))
        self.timer, self.data_waits, self._peaks = StepTimer(warmup, sync=lambda: None), [], {}
        history, last, signum = [], {}, 0
        try:
            train_loader = make_train_loader(self.samples_seen)
            loader = iter(train_loader)
            self._peak_memory()
            logged_at = self.step
            if bar is not None and self.step:
                bar.update(self.step)  # a resumed run's bar starts at its step
            while self.step < max_steps:
                start = time.perf_counter()
                batch = next(loader)
                waited = time.perf_counter() - start
                _sync(self.device)
                start = time.perf_counter()
                loss, grad_norm = self.train_step(batch)
                _sync(self.device)
                seconds = time.perf_counter() - start
                start = time.perf_counter()
                try:
                    loss = self.global_loss(loss)
                except TrainingDiverged:
                    _check_finite(batch, getattr(train_loader, "dataset", None), self.step)
                    raise
                synced = time.perf_counter() - start
                measured = self.timer.measured_steps
                self.timer.record(seconds, batch["x"].shape[0] * self.replicas)
                timed = self.timer.measured_steps > measured
                if timed:
                    self.data_waits.append(waited)
                history.append(loss)
                if bar is not None:
                    bar.update()
                    bar.set_postfix(f"loss {loss:.4g}")
                if self.step % int(cfg.log_every) == 0 or self.step == max_steps:
                    metrics = {M.LOSS_TRAIN: loss, M.GRAD_NORM: float(grad_norm),
                               M.LR: self.scheduler.get_last_lr()[0], M.LAST_STEP_S: seconds,
                               M.LAST_DATA_S: waited, M.LAST_SYNC_S: synced,
                               M.STEP_TIMED: float(timed), **self._peak_memory()}  # fmt: skip
                    runner = getattr(self.model, "runner", None)  # halo traffic when sharded
                    if hasattr(runner, "parallel_metrics"):
                        metrics.update(runner.parallel_metrics(self.step - logged_at))
                        logged_at = self.step
                    self.logger.log_metrics(metrics, self.step)
                    log.info("step %d/%d loss %.4g lr %.2e %.3f s/step", self.step, max_steps, loss,
                             metrics[M.LR], seconds)  # fmt: skip
                if val_loader is not None and (
                    self.step % int(cfg.val_every) == 0 or self.step == max_steps
                ):
                    last = self.validate(val_loader, int(cfg.val_batches))
                    if hasattr(getattr(self.model, "runner", None), "parallel_metrics"):
                        self.model.runner.parallel_metrics()  # validation traffic is not a step's
                    self.logger.log_metrics(last, self.step)
                    log.info("step %d validation loss %.4g, prognostic %.4g vs persistence %.4g: skill %.3f",
                             self.step, last[M.LOSS_VAL], last[LOSS_VAL_PROGNOSTIC],
                             last[LOSS_VAL_PERSISTENCE], last[SKILL_VS_PERSISTENCE])  # fmt: skip
                # Last in the step, so a signal that came during it (logging included) stops
                # the run here; every rank stops at the same step.
                signum = int(self.agree(stop.signum or 0))
                if signum:
                    self.stop_requested, self.stop_signum = True, signum
                    self.stopped_by = signals.signal_name(signum)
                    break
                if self.step % int(cfg.checkpoint_every) == 0:
                    self.save()
            self._peak_memory()
            self.hooks.on_fit_end(self, signum)
            self.save()
        finally:
            if bar is not None:
                bar.close()
            if local is not None:
                local.__exit__(None, None, None)
        if self.stop_requested:
            log.warning("stopped by %s at step %d/%d; checkpoint %s", self.stopped_by, self.step,
                        max_steps, self.checkpoint_path)  # fmt: skip
        summary = {
            "step": self.step,
            "stopped_early": self.stop_requested,
            "stopped_by": self.stopped_by,
            "losses": history,
            "peak_memory": dict(self._peaks),
            **last,
        }
        if self.timer.measured_steps:
            summary.update(self.timer.stats().as_metrics())
            summary[M.DATA_S] = statistics.median(self.data_waits)
        return summary


def _check_finite(batch: dict, dataset, step: int) -> None:
    """Raise :class:`DataError` naming the store and times when ``batch`` holds NaN or inf (a
    damaged dataset, not a diverged training)."""
    bad = sum(int((~torch.isfinite(batch[k])).sum()) for k in ("x", "y"))
    if not bad:
        return
    where = getattr(dataset, "path", "the training dataset")
    times = [int(t) for t in torch.as_tensor(batch.get("index", [])).flatten()]
    dates = getattr(dataset, "dates", None)
    named = ", ".join(f"{t} ({dates[t]})" if dates is not None else str(t) for t in times)
    raise DataError(
        f"dataset {where}: the batch of step {step} holds {bad} NaN or infinite values (windows "
        f"whose last input is at time index {named}); the store is damaged: regenerate or "
        "re-copy it"
    )
