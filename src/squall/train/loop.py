"""The training loop: AdamW, warm-up + cosine schedule, area-weighted MSE with optional rollout,
gradient clipping, bf16 autocast on GPU, validation against persistence, checkpoint and resume.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field

import torch

from squall.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


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


def area_weighted_mse(pred: torch.Tensor, target: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    """Mean over batch, variables and grid points of the squared error, weighted by cell area.

    ``pred, target [B, G, V]``; ``area [G]`` normalised to mean 1. Computed in fp32.
    """
    err = (pred.float() - target.float()).square()
    return (err * area.float()[None, :, None]).mean()


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class ResumableSampler(torch.utils.data.Sampler):
    """Endless shuffled sample order, one fresh permutation per epoch from ``seed + epoch``,
    starting after ``samples_seen`` samples: the data position of a resumed run."""

    def __init__(self, num_samples: int, seed: int, samples_seen: int = 0):
        self.num_samples, self.seed, self.start = num_samples, seed, samples_seen

    def __iter__(self):
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
            yield from order[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self):  # endless; DataLoader only needs this for its own bookkeeping
        return 2**62


@dataclass
class StepTimes:
    """Wall time per step, warm-up excluded from the summary."""

    warmup: int
    times: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        measured = sorted(self.times[self.warmup :])
        if not measured:
            return {}
        median = measured[len(measured) // 2]
        return {
            "median": median,
            "p10": measured[len(measured) // 10],
            "p90": measured[(9 * len(measured)) // 10],
            "count": len(measured),
        }


class Trainer:
    """Train ``model`` on windows from ``loader`` with the settings of ``cfg`` (``conf/training``).

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
    """

    def __init__(self, model, layout: VariableLayout, cfg, device, logger, checkpoint_path=None):
        self.model, self.layout, self.cfg, self.device, self.logger = (
            model,
            layout,
            cfg,
            device,
            logger,
        )
        self.checkpoint_path = checkpoint_path
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
        self.stop_requested = False

    # -- maths ----------------------------------------------------------------------------------

    def rollout_loss(self, batch: dict) -> torch.Tensor:
        """Mean area-weighted MSE over ``rollout`` autoregressive steps (normalised space)."""
        x = batch["x"].to(self.device, non_blocking=True)
        y = batch["y"].to(self.device, non_blocking=True)
        state = x.index_select(-1, self.inputs)
        area = self.model.graph.area
        loss = 0.0
        for r in range(y.shape[1]):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                pred = self.model(state)
            truth = y[:, r]
            loss = loss + area_weighted_mse(pred, truth.index_select(-1, self.outputs), area)
            if r + 1 < y.shape[1]:
                nxt = truth.index_select(-1, self.inputs)  # forcings come from the data
                nxt = nxt.index_copy(
                    -1, self.prog_in, pred.index_select(-1, self.prog_out).to(nxt.dtype)
                )
                state = torch.cat([state[:, 1:], nxt.unsqueeze(1)], dim=1)
        return loss / y.shape[1]

    @torch.no_grad()
    def persistence_loss(self, batch: dict) -> torch.Tensor:
        """The same loss for a forecast that repeats the last input state (diagnostics: zero
        anomaly, i.e. their mean)."""
        x = batch["x"].to(self.device)
        y = batch["y"].to(self.device)
        last = x[:, -1].index_select(-1, self.outputs)
        return torch.stack(
            [
                area_weighted_mse(
                    last, y[:, r].index_select(-1, self.outputs), self.model.graph.area
                )
                for r in range(y.shape[1])
            ]
        ).mean()

    # -- loop -----------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> float:
        self.model.train()
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

    @torch.no_grad()
    def validate(self, loader, max_batches: int) -> dict:
        self.model.eval()
        losses, persist = [], []
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            losses.append(float(self.rollout_loss(batch)))
            persist.append(float(self.persistence_loss(batch)))
        loss, base = sum(losses) / len(losses), sum(persist) / len(persist)
        return {
            "val/loss": loss,
            "val/persistence_loss": base,
            "val/skill_vs_persistence": 1 - loss / base,
        }

    def save(self):
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler,
                            self.step, self.samples_seen)  # fmt: skip

    def resume(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        payload = load_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler)
        self.step, self.samples_seen = payload["step"], payload["samples_seen"]
        log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        return True

    def _request_stop(self, signum, _frame):
        log.warning("signal %d: checkpointing at the end of this step, then stopping", signum)
        self.stop_requested = True

    def fit(self, make_train_loader, val_loader=None) -> dict:
        """Run until ``max_steps``; return a summary dict. ``make_train_loader(samples_seen)``
        builds a loader starting at the data position (after a resume)."""
        cfg = self.cfg
        max_steps = int(cfg.max_steps)
        previous = (
            {s: signal.signal(s, self._request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
            if _main_thread()
            else {}
        )
        times = StepTimes(
            warmup=min(int(cfg.get("timing_warmup_steps", 5)), max(0, max_steps - self.step - 1))
        )
        history, last = [], {}
        try:
            loader = iter(make_train_loader(self.samples_seen))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            while self.step < max_steps and not self.stop_requested:
                batch = next(loader)
                start = time.perf_counter()
                loss, grad_norm = self.train_step(batch)
                loss = float(loss)  # the one host sync per step: the value is logged anyway
                times.times.append(time.perf_counter() - start)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                history.append(loss)
                metrics = {"train/loss": loss, "train/grad_norm": float(grad_norm), "train/lr": self.scheduler.get_last_lr()[0],
                           "time/step_s": times.times[-1], "throughput/samples_per_s": batch["x"].shape[0] / times.times[-1]}  # fmt: skip
                if self.step % int(cfg.log_every) == 0 or self.step == max_steps:
                    metrics.update(memory_metrics(self.device))
                    self.logger.log_metrics(metrics, self.step)
                    log.info("step %d/%d loss %.4g lr %.2e %.3f s/step", self.step, max_steps, loss,
                             metrics["train/lr"], times.times[-1])  # fmt: skip
                if val_loader is not None and (
                    self.step % int(cfg.val_every) == 0 or self.step == max_steps
                ):
                    last = self.validate(val_loader, int(cfg.val_batches))
                    self.logger.log_metrics(last, self.step)
                    log.info("step %d validation loss %.4g persistence %.4g skill %.3f", self.step,
                             last["val/loss"], last["val/persistence_loss"], last["val/skill_vs_persistence"])  # fmt: skip
                if self.step % int(cfg.checkpoint_every) == 0:
                    self.save()
            self.save()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        timing = times.summary()
        summary = {
            "step": self.step,
            "stopped_early": self.stop_requested,
            "losses": history,
            **last,
        }
        if timing:
            summary.update({"time/step_s_median": timing["median"], "time/step_s_p10": timing["p10"],
                            "time/step_s_p90": timing["p90"],
                            "throughput/samples_per_s": int(cfg.batch_size) / timing["median"]})  # fmt: skip
        summary.update(memory_metrics(self.device))
        return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def memory_metrics(device) -> dict:
    """Peak memory of this process: GPU allocator peak on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return {"memory/peak_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30}  # fmt: skip
    import resource

    return {"memory/peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
