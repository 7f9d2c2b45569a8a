"""Metric names (units in the key), step timing, peak memory and the job's own GPU statistics.

Every number squall records goes through a name defined here, so that MLflow's compare views and
``jobs/report.py`` line up across runs. A name ends in its unit (``_s``, ``_GiB``, ``_per_s``,
``_pct``); ratios and counts carry none.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# What one training step is, for every name below: one call of ``Trainer.train_step`` (forward
# and backward of the rollout, the gradient all-reduce of data-parallel replicas and the halo
# exchange of model-parallel ranks inside them, gradient clipping, the optimiser and scheduler
# step), the device synchronised at both ends. It excludes waiting for the batch
# (time/last_data_s, time/data_s) and the collectives the loop adds after the step (the loss
# reduction for logging and the stop agreement: time/last_sync_s).

# Per step, logged at the step (every training.log_every steps; every step in a scaling point).
LOSS_TRAIN = "loss/train"  # area-weighted MSE of the step, mean over the global batch, normalised
LR = "optim/lr"
GRAD_NORM = "optim/grad_norm"  # global L2 norm of the gradients before clipping
LAST_STEP_S = "time/last_step_s"  # wall time of this one step (see above)
LAST_DATA_S = "time/last_data_s"  # wait for this step's batch before the step
LAST_SYNC_S = "time/last_sync_s"  # loss reduction and stop agreement after this step
STEP_TIMED = "time/timed"  # 1 if this step counts in time/step_s, 0 in the timing warm-up

# Validation (every training.val_every steps), area-weighted MSE in normalised units.
LOSS_VAL = "loss/val"
LOSS_VAL_PROGNOSTIC = "loss/val_prognostic"  # the prognostic variables only
LOSS_VAL_PERSISTENCE = "loss/val_persistence"  # prognostic variables, repeating the last state
SKILL_VS_PERSISTENCE = "skill/val_vs_persistence"  # 1 - loss/val_prognostic / loss/val_persistence

# Per run (one training job attempt, or one scaling point): over the timed steps, i.e. after the
# timing warm-up (training.timing_warmup_steps, scale.warmup_steps) of this attempt.
SAMPLES_PER_S = "throughput/samples_per_s"  # global samples (all replicas) / summed step time
STEP_S = "time/step_s"  # median step time
STEP_P10_S = "time/step_p10_s"
STEP_P90_S = "time/step_p90_s"
STEP_SPREAD = "time/step_spread"  # (p90 - p10) / median, dimensionless
DATA_S = "time/data_s"  # median wait for a batch
MEASURED_STEPS = "time/measured_steps"
# The gradient all-reduce measured alone after the steps (scaling points): DDP-sized buckets;
# with an ensemble axis plus the member all-gathers of one step (time/member_gather_s).
COMM_S = "time/comm_s"
COMM_BYTES_PER_STEP = "comm/bytes_per_step"  # gradient bytes each rank all-reduces per step
COMM_SHARE = "comm/share"  # time/comm_s / time/step_s, dimensionless (no overlap assumed)
SAMPLES_PER_S_PER_GPU = "throughput/samples_per_s_per_gpu"
# Ensemble training (model.ensemble.members M): every sample is M member forecasts.
MEMBER_SAMPLES_PER_S = "throughput/member_samples_per_s"  # throughput/samples_per_s x M
MEMBER_SAMPLES_PER_S_PER_GPU = "throughput/member_samples_per_s_per_gpu"
# One step's member all-gathers of the loss measured alone after the steps (scaling points)
MEMBER_GATHER_S = "time/member_gather_s"
# Peak memory: per logging window at a step, the largest window over the run in a summary.
PEAK_ALLOCATED_GIB = "memory/peak_allocated_GiB"
PEAK_RESERVED_GIB = "memory/peak_reserved_GiB"
PEAK_RSS_GIB = "memory/peak_rss_GiB"
HALO_ROWS_SENT = "halo/rows_sent"
HALO_BYTES_PER_STEP = "halo/bytes_per_step"
EDGE_IMBALANCE = "partition/edge_imbalance"  # max / mean edges per rank, all edge sets
NODE_IMBALANCE = "partition/node_imbalance"  # max / mean nodes per rank, worst node set
KERNEL_GBPS = "kernel/achieved_GBps"
MODEL_PARAMETERS = "model/parameters"  # count of trainable and frozen parameters
MODEL_GFLOP_PER_SAMPLE = "model/gflop_per_sample"  # analytic forward GFLOP of one sample
GPU_UTILIZATION_PCT = "system/gpu_utilization_pct"
GPU_MEMORY_USED_GIB = "system/gpu_memory_used_GiB"

#: What a validation returns, logged at the step it ran (a summary repeats the last).
VALIDATION_METRICS = (LOSS_VAL, LOSS_VAL_PROGNOSTIC, LOSS_VAL_PERSISTENCE, SKILL_VS_PERSISTENCE)

# Forecast scores (jobs.forecast), one value per lead time, logged at step = lead time in hours.
# Area-weighted RMSE over the prognostic variables in normalised units (each variable divided by
# its training spread, so variables weigh alike): dimensionless.
FORECAST_RMSE_NORM = "forecast/rmse_normalised"
FORECAST_RMSE_PERSISTENCE_NORM = "forecast/rmse_persistence_normalised"
FORECAST_SKILL = "forecast/skill"  # 1 - mse_model / mse_persistence, dimensionless
# Ensembles and baselines: CRPS (fair CRPS over members; absolute error of a single forecast)
# and member spread in the same normalised units; spread/skill ratio (1 = calibrated) and CRPS
# gain over the reference model (1 - crps_model / crps_reference) dimensionless.
FORECAST_CRPS_NORM = "forecast/crps_normalised"
FORECAST_CRPS_PERSISTENCE_NORM = "forecast/crps_persistence_normalised"
FORECAST_CRPS_REFERENCE_NORM = "forecast/crps_reference_normalised"
FORECAST_RMSE_REFERENCE_NORM = "forecast/rmse_reference_normalised"
FORECAST_SPREAD_NORM = "forecast/spread_normalised"
FORECAST_SPREAD_SKILL = "forecast/spread_skill_ratio"  # sqrt((M+1)/M) spread / RMSE, dimensionless
FORECAST_CRPS_GAIN = "forecast/crps_gain_vs_reference"

GIB = 1024**3


def forecast_rmse(variable: str) -> str:
    """Key of one variable's area-weighted forecast RMSE in the dataset's own units of that
    variable (denormalised), e.g. ``forecast/rmse/2t``."""
    return f"forecast/rmse/{variable}"


def per_rank(name: str, rank: int) -> str:
    """Key of a per-rank value, e.g. ``memory/peak_allocated_GiB/rank3``."""
    return f"{name}/rank{rank}"


def per_device(name: str, device: int | str) -> str:
    """Key of a per-GPU value, e.g. ``system/gpu_utilization_pct/gpu0``."""
    return f"{name}/gpu{device}"


@dataclass(frozen=True)
class StepStats:
    """Timing of the measured steps (warm-up excluded).

    Attributes
    ----------
    steps : int
        Number of measured steps.
    median_s, p10_s, p90_s : float
        Median and 10th/90th percentiles of the step time.
    samples_per_s : float
        Measured samples over measured time.
    """

    steps: int
    median_s: float
    p10_s: float
    p90_s: float
    samples_per_s: float

    @property
    def spread(self) -> float:
        """``(p90 - p10) / median``: 0.1 means the middle 80 % of steps lie within 10 %."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0

    def as_metrics(self) -> dict[str, float]:
        """The stats under their metric names."""
        return {
            STEP_S: self.median_s,
            STEP_P10_S: self.p10_s,
            STEP_P90_S: self.p90_s,
            STEP_SPREAD: self.spread,
            SAMPLES_PER_S: self.samples_per_s,
            MEASURED_STEPS: float(self.steps),
        }


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class StepTimer:
    """Wall time of training steps, excluding the first ``warmup`` (compilation, autotuning).

    Parameters
    ----------
    warmup : int
        Steps to discard at the start.
    sync : callable, optional
        Called before reading the clock at both ends of a step; defaults to
        ``torch.cuda.synchronize`` when CUDA is initialised, so GPU work is counted in its step.
    clock : callable
        Seconds as a float; ``time.perf_counter`` by default.

    Examples
    --------
    >>> timer = StepTimer(warmup=2)
    >>> for batch in range(5):
    ...     with timer.step(samples=8):
    ...         pass
    >>> timer.stats().steps
    3
    """

    def __init__(self, warmup: int = 0, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if warmup < 0:
            raise ValueError(f"warmup={warmup} must be >= 0")
        self.warmup = warmup
        self._sync = sync if sync is not None else _default_sync()
        self._clock = clock
        self._seen = 0
        self._times: list[float] = []
        self._samples: list[int] = []

    @contextmanager
    def step(self, samples: int = 1) -> Iterator[None]:
        """Time one step that processes ``samples`` samples."""
        self._sync()
        start = self._clock()
        yield
        self._sync()
        self.record(self._clock() - start, samples)

    def record(self, seconds: float, samples: int = 1) -> None:
        """Add a step timed elsewhere; it is discarded while still in warm-up."""
        self._seen += 1
        if self._seen > self.warmup:
            self._times.append(seconds)
            self._samples.append(samples)

    @property
    def measured_steps(self) -> int:
        """Steps recorded after warm-up."""
        return len(self._times)

    def stats(self) -> StepStats:
        """Summary of the measured steps.

        Raises
        ------
        ValueError
            If no step has been measured yet (all still in warm-up).
        """
        if not self._times:
            raise ValueError(f"no step measured yet: {self._seen} seen, warm-up {self.warmup}")
        ordered = sorted(self._times)
        total = sum(self._times)
        return StepStats(
            steps=len(ordered),
            median_s=statistics.median(ordered),
            p10_s=_quantile(ordered, 0.1),
            p90_s=_quantile(ordered, 0.9),
            samples_per_s=sum(self._samples) / total if total > 0 else float("inf"),
        )

    def reset(self, keep_warmup_done: bool = True) -> None:
        """Forget measured steps (a new logging window); warm-up is not repeated by default."""
        self._times.clear()
        self._samples.clear()
        if not keep_warmup_done:
            self._seen = 0


def _default_sync() -> Callable[[], None]:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def peak_memory(device: int | None = None, reset: bool = True) -> dict[str, float]:
    """Peak memory since the last reset, in GiB, then reset the peak (one logging window).

    Parameters
    ----------
    device : int, optional
        CUDA device; the current one when omitted. Ignored on CPU.
    reset : bool
        Reset CUDA's peak statistics so the next call covers the next window.

    Returns
    -------
    dict
        On CUDA :data:`PEAK_ALLOCATED_GIB` and :data:`PEAK_RESERVED_GIB`. Without CUDA,
        :data:`PEAK_RSS_GIB`, the process's peak resident memory since it started (the kernel
        cannot reset it).
    """
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device() if device is None else device
        out = {
            PEAK_ALLOCATED_GIB: torch.cuda.max_memory_allocated(dev) / GIB,
            PEAK_RESERVED_GIB: torch.cuda.max_memory_reserved(dev) / GIB,
        }
        if reset:
            torch.cuda.reset_peak_memory_stats(dev)
        return out
    # ru_maxrss is in KiB on Linux.
    return {PEAK_RSS_GIB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def own_gpu_ids() -> list[str]:
    """Identifiers of the GPUs this job may use, as NVML knows them (indices or UUIDs).

    From ``CUDA_VISIBLE_DEVICES`` when set (Slurm sets it to the job's GPUs); otherwise every GPU
    torch sees. Empty without CUDA.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class GpuSampler:
    """Background sampling of utilisation and memory of this job's own GPUs only.

    Uses NVML (``pynvml``) when installed, restricted to :func:`own_gpu_ids`, so neighbours on a
    shared node are never reported; without NVML it reads ``torch.cuda`` for the current device
    only (``mem_get_info`` would create a CUDA context on every other device). A no-op without
    CUDA.

    Parameters
    ----------
    interval_s : float
        Seconds between samples; 5 s keeps the NVML cost negligible next to a training step.

    Examples
    --------
    >>> with GpuSampler(interval_s=1.0) as sampler:
    ...     pass
    >>> sampler.collect()  # doctest: +SKIP
    {'system/gpu_utilization_pct/gpu0': 97.0, ...}
    """

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._readers = _gpu_readers()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is any GPU of this job to sample."""
        return bool(self._readers)

    def sample(self) -> None:
        """Take one sample of every own GPU now."""
        for read in self._readers:
            values = read()
            with self._lock:
                for key, value in values.items():
                    self._sums[key] = self._sums.get(key, 0.0) + value
                    self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> dict[str, float]:
        """Mean of each value since the last collect, then start a new window."""
        with self._lock:
            out = {k: self._sums[k] / self._counts[k] for k in self._sums}
            self._sums.clear()
            self._counts.clear()
        return out

    def start(self) -> GpuSampler:
        """Start sampling in a daemon thread (nothing happens without GPUs)."""
        if self.enabled and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="squall-gpu-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; samples taken so far stay available to :meth:`collect`."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _gpu_readers() -> list[Callable[[], dict[str, float]]]:
    """One callable per own GPU returning its utilisation and used memory."""
    ids = own_gpu_ids()
    if not ids:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # pynvml missing or no driver: fall back to torch for the current device
        return _torch_reader()

    readers = []
    for label, ident in enumerate(ids):
        if ident.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(ident))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(ident)

        def read(handle=handle, label=label) -> dict[str, float]:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return {per_device(GPU_UTILIZATION_PCT, label): float(util.gpu),
                    per_device(GPU_MEMORY_USED_GIB, label): mem.used / GIB}

        readers.append(read)
    return readers


def _torch_reader() -> list[Callable[[], dict[str, float]]]:
    import torch

    if not torch.cuda.is_available():
        return []
    dev = torch.cuda.current_device()

    def read() -> dict[str, float]:
        free, total = torch.cuda.mem_get_info(dev)
        out = {per_device(GPU_MEMORY_USED_GIB, dev): (total - free) / GIB}
        try:
            out[per_device(GPU_UTILIZATION_PCT, dev)] = float(torch.cuda.utilization(dev))
        except Exception:  # torch.cuda.utilization needs NVML; memory alone is still useful
            pass
        return out

    return [read]


# Forecast and profiling speed (jobs.forecast, jobs.profile, profiling/bench_forecast.py).
FORECAST_STEP_S = "forecast/step_s"  # median seconds of one rollout step (device time on a GPU)
FORECAST_ROLLOUT_S = "forecast/rollout_s"  # forecast/step_s x steps: one start's rollout
FORECAST_TOTAL_S = "forecast/total_s"  # wall time of all starts, until the last field is written
FORECAST_WRITE_WAIT_S = "forecast/write_wait_s"  # the rollout waited on the zarr writer (queue full)
PROFILE_STEP_S = "profile/step_s"  # median wall time of a profiled step


def profile_component_s(component: str) -> str:
    """Key of one component's time per profiled step (``encoder``, ``processor``, ``decoder``,
    ``optimiser``, ``communication``), e.g. ``profile/encoder_s``."""
    return f"profile/{component}_s"
