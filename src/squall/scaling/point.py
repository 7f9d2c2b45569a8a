"""One point of a scaling sweep: join the process group, build, warm up, time N training steps.

Run by every rank of the point (``jobs/scale.py``). The order:

1. :func:`~squall.scaling.plan.plan_point` checks the layout; the launcher's world size must match.
2. ``torch.distributed`` from the launcher's environment (:mod:`squall.distributed.env`): NCCL on
   GPUs, gloo on CPU.
3. Rank 0 builds graph, dataset and model first (it may write the graph cache and the synthetic
   dataset), the others after a barrier. Model-parallel points shard the model in place
   (:func:`squall.parallel.parallelize.parallelize`; each rank reads its grid rows, gradients are
   reduced by the model); pure data-parallel points wrap it in DDP.
4. ``scale.warmup_steps`` untimed steps, then ``scale.steps`` timed ones, each a real training
   step (:meth:`squall.train.loop.Trainer.train_step`) on batches drawn for this data-parallel
   rank. A checkpoint every ``scale.checkpoint_every`` steps; on SIGUSR1/SIGUSR2/SIGTERM all
   ranks agree to stop after the current step, rank 0 checkpoints and asks Slurm why the signal
   came (:func:`squall.scaling.slurm.stop_cause`): a time-limit warning or a preemption is
   handed to submitit's handler (which requeues the job), a job Slurm requeued itself just
   exits, a cancelled one ends KILLED and is not requeued. A resumed point repeats its warm-up
   and times all its steps again: timings come from one allocation, the last. Each attempt's
   job id, array index, nodes, start, end, why it ended and its own median step time are tags
   ``attempt.<n>.*`` of the point's one run.
5. The gradient all-reduce measured alone (``time/comm_s``, ``comm/bytes_per_step``), the halo
   volume of model-parallel points from their plans, peak memory of every rank, the job's own GPU
   statistics; rank 0 logs all of it to the point's MLflow run.

Anything that goes wrong is recorded on the run (``squall.failure_reason`` tag, status FAILED)
before it propagates, so the sweep's report can show why.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf, open_dict

from squall.data.sampler import EpochSampler
from squall.data.setup import ensure_dataset
from squall.data.zarr_dataset import make_dataloader
from squall.distributed.env import DistEnv, destroy_distributed, dist_env, init_distributed
from squall.errors import SquallError
from squall.graphs import load_or_build
from squall.scaling import slurm
from squall.scaling.plan import LayoutError, PointPlan, plan_point
from squall.scaling.sweep import FAILURE_TAG, INTERRUPT_TAG, NODELIST_TAG
from squall.tracking import NullLogger, RunLogger
from squall.tracking import metrics as M
from squall.tracking.environment import collect_environment
from squall.tracking.metrics import GpuSampler, StepTimer, peak_memory
from squall.train.checkpoint import load_checkpoint, save_checkpoint
from squall.train.runner import build_run

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
#: DDP's default gradient bucket (torch.nn.parallel.DistributedDataParallel bucket_cap_mb=25):
#: the comm probe all-reduces buckets of this size, as DDP does.
DDP_BUCKET_BYTES = 25 * 1024**2


class PointInterrupted(SquallError):
    """The point stopped on a signal after writing its checkpoint; rerunning it resumes."""


def one_line(err: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for tags and tables)."""
    text = str(err).strip().splitlines()
    msg = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@dataclass
class Progress:
    """What survives a requeue, stored in the checkpoint's ``extra``.

    ``measured_s``/``data_s`` are the timed steps of the current attempt only; ``history`` keeps
    one summary per earlier attempt (its tags, see :func:`_attempt_tags`).
    """

    measured_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    attempts: int = 0
    history: list[dict] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _point_config(cfg, plan: PointPlan, device: torch.device):
    """The training config of this point: per-rank batch, step budget, device."""
    point = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(point):
        point.training.batch_size = plan.batch_per_rank
        point.training.max_steps = int(cfg.scale.warmup_steps) + int(cfg.scale.steps)
        point.training.device = str(device)
    return point


def _batches(dataset, batch: int, seed: int, rank: int, replicas: int, workers: int,
             start_batch: int, pin: bool) -> Iterator[dict]:
    """Endless batches of this data-parallel rank, continuing after ``start_batch`` batches."""
    sampler = EpochSampler(len(dataset), shuffle=True, seed=seed, rank=rank,
                           num_replicas=replicas, drop_last=True)
    per_epoch = sampler.per_rank // batch
    if per_epoch < 1:
        raise LayoutError(f"{len(dataset)} training windows give no batch of {batch} to each of "
                          f"{replicas} data-parallel ranks; lower scale.batch or use more data")
    epoch, done = divmod(start_batch, per_epoch)
    while True:
        sampler.set_position(epoch, done * batch)
        loader = make_dataloader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                 drop_last=True, pin_memory=pin)
        yield from loader
        epoch, done = epoch + 1, 0


def _gradient_allreduce_s(model: torch.nn.Module, device: torch.device, repeats: int) -> tuple[float, int]:
    """Median time of all-reducing the model's gradient bytes in DDP-sized buckets, alone.

    DDP overlaps these all-reduces with the backward pass, so ``time/comm_s / time/step_s`` is
    the share communication would take without overlap: an upper bound of its true cost.
    Returns ``(seconds, bytes per rank per step)``; ``(0, 0)`` for one rank.
    """
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if dist.get_world_size() == 1 or nbytes == 0:
        return 0.0, 0
    elements = [min(DDP_BUCKET_BYTES, nbytes - i) // 4 for i in range(0, nbytes, DDP_BUCKET_BYTES)]
    buckets = [torch.ones(max(1, n), device=device) for n in elements]
    times = []
    for _ in range(repeats + 1):  # the first round sets up the connections: not timed
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for b in buckets:
            dist.all_reduce(b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), nbytes


class _StopFlag:
    """Signal handlers that ask for a stop at the end of the step; restores the previous ones."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
        from threading import current_thread, main_thread

        if current_thread() is main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, _frame) -> None:
        log.warning("signal %s: checkpointing after this step, then stopping",
                    signal.Signals(signum).name)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none): every rank stops at the same step."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def _under_submitit() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_FOLDER" in os.environ


def run_point(cfg, logger_factory, point_id: str | None = None) -> dict:
    """Run this rank's part of the point described by ``cfg``; return rank 0's summary.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``conf/scale.yaml``.
    logger_factory : callable
        ``logger_factory(env, plan) -> RunLogger`` for rank 0 (other ranks get a null logger).
    point_id : str, optional
        Identity of this point (sweep id and job number): a checkpoint in the run directory is
        resumed only if it was written by the same point (not by an earlier sweep into the same
        directory). None: any checkpoint there is resumed.

    Returns
    -------
    dict
        Summary metrics on rank 0; an empty dict on the other ranks.

    Raises
    ------
    LayoutError
        If the layout cannot run, or the launcher started a different number of ranks.
    PointInterrupted
        After a stop signal, once the checkpoint is written (when not requeued by submitit).
    """
    plan = plan_point(cfg)
    env = dist_env(backend=cfg.cluster.get("backend"))
    if env.world_size != plan.gpus:
        raise LayoutError(
            f"point asks for parallel.gpus={plan.gpus} ranks but runs as {env.world_size} "
            f"process(es) ({env.source}): launch it with --multirun (the launcher starts the ranks) "
            f"or srun/torchrun with {plan.gpus} tasks"
        )
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    init_distributed(env, timeout_s=float(cfg.scale.collective_timeout_s))
    logger: RunLogger = NullLogger()
    try:
        if env.is_main:
            logger = logger_factory(env, plan)
        try:
            try:
                # Stop signals are caught from here on: one that comes while the point is still
                # building stops it after its first step, with a checkpoint, instead of killing it.
                with _StopFlag() as stop:
                    summary = _measure(cfg, plan, env, logger, point_id, stop)
            except _Stopped as stopped:  # handlers restored: submitit's is the one to call now
                _interrupted(stopped, env, logger)
        except SystemExit:  # submitit requeued the job (tagged already) or it was told to exit
            logger.finish("KILLED")
            raise
        except BaseException as err:
            interrupted = isinstance(err, PointInterrupted | KeyboardInterrupt)
            logger.set_tags({INTERRUPT_TAG if interrupted else FAILURE_TAG: one_line(err)})
            logger.finish("KILLED" if interrupted else "FAILED")
            raise
        logger.finish("FINISHED")
        return summary if env.is_main else {}
    finally:
        destroy_distributed()


class _Stopped(Exception):
    """Raised by the step loop once every rank has stopped on a signal and the checkpoint is
    written; turned into a requeue, an exit or :class:`PointInterrupted` by :func:`run_point`."""

    def __init__(self, signum: int, step: int, ckpt: Path, cause: str) -> None:
        super().__init__(signum, step, ckpt, cause)
        self.signum, self.step, self.ckpt, self.cause = signum, step, ckpt, cause


#: Stop causes in the order of their codes, for the broadcast from rank 0.
CAUSES = (slurm.UNKNOWN, slurm.WARNING, slurm.REQUEUED, slurm.PREEMPTED, slurm.CANCELLED,
          slurm.TIMEOUT)


def _agreed_cause(signum: int, env: DistEnv, device: torch.device) -> str:
    """Rank 0 asks Slurm why ``signum`` came; every rank gets its answer."""
    code = torch.tensor([CAUSES.index(slurm.stop_cause(signum)) if env.is_main else 0],
                        dtype=torch.int64, device=device)
    dist.broadcast(code, src=0)
    return CAUSES[int(code.item())]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _attempt_tags(entry: dict) -> dict[str, str]:
    """``attempt.<n>.<key>`` tags of one attempt's summary."""
    n = entry["attempt"]
    return {f"attempt.{n}.{k}": v for k, v in entry.items() if k != "attempt"}


def _measure(cfg, plan: PointPlan, env: DistEnv, logger: RunLogger, point_id: str | None,
             stop: _StopFlag) -> dict:
    s = cfg.scale
    device = torch.device("cuda", env.local_rank) if env.backend == "nccl" else torch.device("cpu")
    point = _point_config(cfg, plan, device)
    if env.is_main:
        logger.log_config(point)
        logger.log_params(plan.as_params())
        env_info = collect_environment()
        logger.set_tags({f"env.{k}": v for k, v in env_info.items()} | {
            "point.layout": plan.layout, "point.gpus": plan.gpus, "point.nodes": plan.nodes,
            "point.backend": env.backend, "point.attention_backend": cfg.model.attention_backend,
            **_attention_ran(str(cfg.model.attention_backend), device),
            "point.graph": cfg.graph.name, "point.model": cfg.model.name,
            "point.rank0_host": env_info["hostname"],
        })
    # Rank 0 first: it may build the graph cache and generate the synthetic dataset.
    if env.is_main:
        _prepare(point)
    dist.barrier()
    # The layout is applied by build_run (squall.parallel): a model-parallel point is sharded in
    # place and its datasets hold this rank's grid rows; data-parallel replicas go through DDP.
    # Every rank enters it together: process groups and DDP's parameter broadcast are collectives.
    parts = build_run(point, NullLogger(), device=device, distribute=True)
    model, trainer = parts.model, parts.trainer
    setup = parts.parallel
    dp_rank, halo = setup.data_parallel_rank, {}
    if plan.model_parallel > 1:
        halo = _halo_volume(model, parts.graph, plan, device, int(point.training.rollout))

    ckpt = Path(str(point.training.run_dir)) / "checkpoint.pt"
    owner = ckpt.with_suffix(".json")  # which point wrote the checkpoint
    progress, start = Progress(), 0
    if ckpt.exists() and point_id is not None and (
            not owner.exists() or json.loads(owner.read_text()).get("point_id") != point_id):
        log.warning("%s belongs to another sweep's point: starting afresh", ckpt)
    elif ckpt.exists() and bool(point.training.resume):
        payload = load_checkpoint(ckpt, model, trainer.optimizer, trainer.scheduler)
        start = int(payload["step"])
        progress = Progress(**payload["extra"].get("progress", {}))
        log.info("resumed point at step %d from %s", start, ckpt)
    # An attempt that died before its first checkpoint still counts: Slurm's restart count.
    where = slurm.attempt_from_env()
    progress.attempts = max(progress.attempts, int(where["restarts"])) + 1
    # Timings come from one allocation: a resumed point times all its steps again here (on
    # another node, perhaps); the earlier attempts' numbers stay in their attempt tags.
    progress.measured_s, progress.data_s = [], []
    attempt = {"attempt": progress.attempts, "job_id": where["job_id"],
               "array_index": where["array_index"], "nodes": where["nodes"], "start": _now(),
               "first_step": start + 1}
    trainer.step = start
    warmup, steps = int(s.warmup_steps), int(s.steps)
    total = start + warmup + steps  # warm-up is repeated after a resume
    if env.is_main:
        logger.set_tags({"point.attempts": progress.attempts, NODELIST_TAG: where["nodes"],
                         **_attempt_tags(attempt)})

    def attempt_summary(ended: str) -> dict:
        timed = progress.measured_s
        return attempt | {"end": _now(), "ended": ended, "timed_steps": len(timed),
                          "step_s": f"{statistics.median(timed):.6g}" if timed else "-"}

    batches = _batches(parts.train_set, plan.batch_per_rank, int(point.training.seed), dp_rank,
                       plan.data_parallel, int(point.data.get("num_workers", 0)), start,
                       device.type == "cuda")
    pending: list[tuple[dict, int]] = []

    def flush() -> None:
        for metrics, step in pending:
            logger.log_metrics(metrics, step)
        pending.clear()

    def save() -> None:
        if env.is_main:
            save_checkpoint(ckpt, model, trainer.optimizer, trainer.scheduler, trainer.step,
                            trainer.samples_seen, extra={"progress": vars(progress)})
            owner.write_text(json.dumps({"point_id": point_id}) + "\n")
        dist.barrier()

    sampler = GpuSampler() if env.local_rank == 0 else None
    peak_memory(reset=True)
    stopped_by = 0
    with sampler or _Nothing():
        first = trainer.step
        while trainer.step < total:
            t0 = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - t0
            _sync(device)
            t0 = time.perf_counter()
            loss, grad_norm = trainer.train_step(batch)
            _sync(device)
            seconds = time.perf_counter() - t0
            loss = trainer.global_loss(loss)  # outside the timed span (a collective when sharded)
            timed = trainer.step - first > warmup
            if timed:
                progress.measured_s.append(seconds)
                progress.data_s.append(waited)
            pending.append(({M.LOSS_TRAIN: loss, M.GRAD_NORM: float(grad_norm),
                             M.LR: trainer.scheduler.get_last_lr()[0], "time/last_step_s": seconds,
                             "time/last_data_s": waited, "time/timed": float(timed)}, trainer.step))
            stopped_by = stop.agreed(device)
            cause = _agreed_cause(stopped_by, env, device) if stopped_by else ""
            if stopped_by:
                name = signal.Signals(stopped_by).name
                progress.history.append(attempt_summary(f"{cause} ({name}) at step {trainer.step}"))
            if trainer.step % int(s.checkpoint_every) == 0 or stopped_by:
                flush()
                save()
            if stopped_by:
                if env.is_main:
                    logger.set_tags(_attempt_tags(progress.history[-1]))
                break
        flush()
        if sampler:
            sampler.sample()  # at least one sample, however short the point
    if stopped_by:
        raise _Stopped(stopped_by, trainer.step, ckpt, cause)
    progress.history.append(attempt_summary("completed"))
    if env.is_main:
        logger.set_tags(_attempt_tags(progress.history[-1]))
    save()

    comm_s, comm_bytes = _gradient_allreduce_s(model, device, int(s.comm_repeats))
    memory = peak_memory(reset=False)
    gpu = sampler.collect() if sampler else {}
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, {"rank": env.rank, "node": env.node_rank, "memory": memory,
                                      "gpu": gpu})
    timer = StepTimer(warmup=0, sync=lambda: None)
    for sec in progress.measured_s:
        timer.record(sec, plan.global_batch)
    stats = timer.stats()
    summary = stats.as_metrics() | {
        M.COMM_S: comm_s, M.COMM_BYTES_PER_STEP: float(comm_bytes),
        M.COMM_SHARE: comm_s / stats.median_s if stats.median_s > 0 else 0.0,
        M.DATA_S: statistics.median(progress.data_s),
        M.SAMPLES_PER_S_PER_GPU: stats.samples_per_s / plan.gpus,
        # Data-parallel points exchange no halo.
        M.HALO_BYTES_PER_STEP: 0.0, M.HALO_ROWS_SENT: 0.0, **halo,
        M.MODEL_PARAMETERS: float(model.num_parameters()),
        M.MODEL_GFLOP_PER_SAMPLE: model.flops_per_sample() / 1e9,
    }
    for entry in gathered:
        for key, value in entry["memory"].items():
            summary[M.per_rank(key, entry["rank"])] = value
        for key, value in entry["gpu"].items():
            summary[f"{key}/node{entry['node']}"] = value
    for key in gathered[0]["memory"]:
        summary[key] = max(entry["memory"][key] for entry in gathered)
    if env.is_main:
        logger.log_metrics(summary, trainer.step)
        log.info("point %s: %.4g s/step (spread %.2f), %.4g samples/s, comm %.3g s", plan.layout,
                 stats.median_s, stats.spread, stats.samples_per_s, comm_s)
    return summary


def _halo_volume(model, graph, plan: PointPlan, device: torch.device,
                 rollout: int) -> dict[str, float]:
    """Halo traffic of this point per step, from its halo plans (largest rank).

    Rows sent per step: every edge set's send rows times its uses (encoder and decoder once, the
    processor once per layer) times the rollout, forward and again backward (the gradients of the
    halo rows go back). Bytes: rows x channels x element size (bf16 on GPU, fp32 on CPU) x batch
    per rank.
    """
    from squall.parallel.parallelize import build_plans
    from squall.parallel.partition import partition_report

    cfg = model.cfg
    uses = {"encoder": 1, "processor": int(cfg.processor_layers), "decoder": 1}
    sent = [sum(int(p[role].send_counts.sum()) * n for role, n in uses.items()) * 2 * rollout
            for p in build_plans(graph, model.partition)]
    element = 2 if device.type == "cuda" else 4
    rows = max(sent)
    balance = partition_report(graph, model.partition)
    return {M.HALO_ROWS_SENT: float(rows),
            M.HALO_BYTES_PER_STEP: float(rows * int(cfg.num_channels) * element
                                         * plan.batch_per_rank),
            M.EDGE_IMBALANCE: balance.edge_imbalance["total"],
            M.NODE_IMBALANCE: max(balance.node_imbalance.values())}


def _attention_ran(backend: str, device: torch.device) -> dict[str, str]:
    """Tags of the attention backend that runs on ``device`` (``triton`` falls back to the torch
    reference without a GPU) and why it is not the one asked for."""
    from squall.kernels.gt_attention import resolve_backend

    used, why = resolve_backend(backend, device)
    return {"point.attention_backend_used": used} | ({"point.attention_fallback": why} if why else {})


def _prepare(point) -> None:
    """Build the graph cache and the synthetic dataset if missing, one point at a time: points
    of a sweep that run side by side (a Slurm array) share the cache directory."""
    cache = Path(str(point.paths.cache))
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            graph = load_or_build(point.graph, cache / "graphs")
            ensure_dataset(point, graph.nodes["data"])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


#: Exit status of a point that stopped on SIGTERM and is not requeued by itself (128 + 15, the
#: status a process killed by SIGTERM has).
EXIT_TERMINATED = 128 + signal.SIGTERM


def _interrupted(stopped: _Stopped, env: DistEnv, logger: RunLogger) -> None:
    """Act on a stop, by its cause (table in :mod:`squall.scaling.slurm`).

    The checkpoint is written. A time-limit warning or a preemption goes to submitit's own
    handler on rank 0 (it requeues the job and exits; the other ranks exit quietly). A job that
    Slurm requeued itself exits on every rank without a result (the next attempt resumes). A
    cancelled job, or one at its time limit, ends its run KILLED with the reason and exits
    non-zero. Outside submitit the stop is raised as :class:`PointInterrupted`.
    """
    name = signal.Signals(stopped.signum).name
    where = f"at step {stopped.step}; checkpoint {stopped.ckpt}"
    previous = signal.getsignal(signal.SIGUSR2)
    requeue = stopped.cause in (slurm.WARNING, slurm.PREEMPTED)
    if _under_submitit() and requeue and callable(previous):
        if env.is_main:
            logger.finish("KILLED")
            destroy_distributed()
            previous(signal.SIGUSR2, None)  # submitit: checkpoint the launcher, requeue, exit
        raise SystemExit(EXIT_TERMINATED)
    if _under_submitit() and stopped.cause == slurm.REQUEUED:
        log.warning("Slurm requeued this job (%s %s): exiting, the next attempt resumes", name,
                    where)
        raise SystemExit(EXIT_TERMINATED)
    if stopped.cause in (slurm.CANCELLED, slurm.TIMEOUT):
        what = "cancelled (scancel)" if stopped.cause == slurm.CANCELLED else "time limit reached"
        logger.set_tags({INTERRUPT_TAG: f"{what}: {name} {where}"})
        raise SystemExit(EXIT_TERMINATED)
    raise PointInterrupted(f"{name} {where}; run the point again to resume")
