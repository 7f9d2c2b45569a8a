"""One point of a scaling sweep: join the process group, build, then time training steps.

Run by every rank of the point (``jobs/scale.py``). A point is a measurement wrapper around the
one training loop (:meth:`squall.train.loop.Trainer.fit`); the order:

1. :func:`~squall.scaling.plan.plan_point` checks the layout; the launcher's world size must match.
2. ``torch.distributed`` from the launcher's environment (:mod:`squall.distributed.env`): NCCL on
   GPUs, gloo on CPU.
3. Rank 0 builds graph and dataset first (it may write the graph cache and the synthetic
   dataset), the others after a barrier; then every rank builds the run as ``jobs.train`` does
   (:func:`squall.train.runner.build_run`: the layout is applied by :mod:`squall.parallel`).
4. The point's training config (:func:`point_config`): the per-rank batch of the plan, a step
   budget of ``scale.warmup_steps + scale.steps``, ``scale.warmup_steps`` left out of the timing,
   a checkpoint every ``scale.checkpoint_every`` steps. ``Trainer.fit`` then runs the steps on the
   training sampler of ``jobs.train`` (:class:`squall.data.sampler.ResumableSampler`) and logs
   every step to the point's run, as ``jobs.train`` logs to its own.
5. On SIGUSR1/SIGUSR2/SIGTERM (caught from the start of the build) all ranks agree to stop after
   the current step; rank 0 asks Slurm why the signal came (:func:`squall.scaling.slurm.
   stop_cause`) and the checkpoint is written: a time-limit warning or a preemption is handed to
   submitit's handler (which requeues the job), a job Slurm requeued itself just exits, a
   cancelled one ends KILLED and is not requeued. A resumed point repeats its warm-up and times
   all its steps again: timings come from one allocation, the last. Each attempt's job id, array
   index, nodes, start, end, why it ended and its own median step time are tags
   ``attempt.<n>.*`` of the point's one run (kept across requeues in the checkpoint, through
   :class:`PointHooks`).
6. The gradient all-reduce measured alone (``time/comm_s``, ``comm/bytes_per_step``; with an
   ensemble axis plus the member all-gathers of the loss, ``time/member_gather_s``), the halo
   volume of model-parallel points from their plans, peak memory of every rank, the job's own GPU
   statistics; rank 0 logs all of it to the point's MLflow run.

Anything that goes wrong is recorded on the run (``squall.failure_reason`` tag, status FAILED)
before it propagates, so the sweep's report can show why.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf, open_dict

from squall.distributed.env import DistEnv, destroy_distributed, dist_env, init_distributed
from squall.errors import SquallError
from squall.scaling import slurm
from squall.scaling.inputs import build_inputs
from squall.scaling.plan import LayoutError, PointPlan, plan_point
from squall.scaling.state import FAILURE_TAG, INTERRUPT_TAG, NODELIST_TAG, one_line
from squall.tracking import NullLogger, RunLogger
from squall.tracking import metrics as M
from squall.tracking.environment import collect_environment
from squall.tracking.metrics import GpuSampler
from squall.train.checkpoint import checkpoint_extra
from squall.train.loop import Trainer, TrainerHooks
from squall.train.runner import build_run, train_loader_factory
from squall.train.signals import StopSignals

log = logging.getLogger(__name__)

#: Signals that stop a point after its step: Slurm's warning (``--signal=USR1``), submitit's
#: time-limit signal (USR2) and scancel / preemption / requeue (TERM).
POINT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
#: DDP's default gradient bucket (torch.nn.parallel.DistributedDataParallel bucket_cap_mb=25):
#: the comm probe all-reduces buckets of this size, as DDP does.
DDP_BUCKET_BYTES = 25 * 1024**2


class PointInterrupted(SquallError):
    """The point stopped on a signal after writing its checkpoint; rerunning it resumes."""


@dataclass
class Progress:
    """What survives a requeue, stored in the checkpoint: the number of attempts so far and one
    summary per finished attempt (its tags, see :func:`_attempt_tags`)."""

    attempts: int = 0
    history: list[dict] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def point_config(cfg, plan: PointPlan, device: torch.device):
    """The training config of this point: ``conf/scale.yaml``'s training settings with the
    per-rank batch of the plan, a step budget of warm-up plus timed steps (the learning-rate
    schedule's length), the warm-up left out of the timing and the point's checkpoint interval.
    ``jobs.train`` on this config trains exactly what the point times."""
    point = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    s = cfg.scale
    with open_dict(point):
        point.training.batch_size = plan.batch_per_rank
        point.training.max_steps = int(s.warmup_steps) + int(s.steps)
        point.training.timing_warmup_steps = int(s.warmup_steps)
        point.training.checkpoint_every = int(s.checkpoint_every)
        point.training.device = str(device)
    return point


class PointHooks(TrainerHooks):
    """The point's part of the training loop: which point wrote a checkpoint, its attempts, and
    why this attempt ended (Slurm's cause of a stop signal, asked by rank 0)."""

    def __init__(self, point_id: str | None, env: DistEnv, device: torch.device) -> None:
        self.point_id, self.env, self.device = point_id, env, device
        self.progress = Progress()
        self.attempt: dict = {}
        self.cause = ""

    def state_dict(self) -> dict:
        return {"point_id": self.point_id, "progress": asdict(self.progress)}

    def load_state_dict(self, state: dict) -> None:
        known = state.get("progress", {})
        self.progress = Progress(int(known.get("attempts", 0)), list(known.get("history", [])))

    def on_fit_end(self, trainer: Trainer, signum: int) -> None:
        if signum:
            self.cause = _agreed_cause(signum, self.env, self.device)
            ended = f"{self.cause} ({signal.Signals(signum).name}) at step {trainer.step}"
        else:
            ended = "completed"
        timed = trainer.timer.measured_steps
        step_s = f"{trainer.timer.stats().median_s:.6g}" if timed else "-"
        self.progress.history.append(self.attempt | {"end": _now(), "ended": ended,
                                                     "timed_steps": timed, "step_s": step_s})


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


def _member_gather_s(model, plan: PointPlan, device: torch.device, rollout: int,
                     repeats: int) -> float:
    """Median time of one step's member all-gathers alone (the loss's, one per rollout step):
    ``[batch, members / ensemble, G_local, V_out]`` in the training dtype's activations (bf16 on
    GPU, fp32 on CPU) over the ensemble group; 0 without one."""
    gather = getattr(model, "member_gather", None)
    if gather is None:
        return 0.0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    local = torch.ones(plan.batch_per_rank, plan.members // plan.ensemble, model.graph.num_data,
                       model.head.out_features, device=device, dtype=dtype)  # fmt: skip
    times = []
    for _ in range(repeats + 1):  # the first round sets up the connections: not timed
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(rollout):
            gather(local)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


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
                with StopSignals(immediate=False, signals=POINT_SIGNALS):
                    summary = _measure(cfg, plan, env, logger, point_id)
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


def _measure(cfg, plan: PointPlan, env: DistEnv, logger: RunLogger,
             point_id: str | None) -> dict:
    s = cfg.scale
    device = torch.device("cuda", env.local_rank) if env.backend == "nccl" else torch.device("cpu")
    point = point_config(cfg, plan, device)
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
        build_inputs(point)
    dist.barrier()
    # Every rank enters build_run together: process groups and DDP's parameter broadcast are
    # collectives. Rank 0's trainer logs every step to the point's run.
    hooks = PointHooks(point_id, env, device)
    parts = build_run(point, logger, device=device, distribute=True, hooks=hooks)
    model, trainer = parts.model, parts.trainer
    halo = {}
    if plan.model_parallel > 1:
        halo = _halo_volume(model, parts.graph, plan, device, int(point.training.rollout))
    make_loader = train_loader_factory(parts, point)

    ckpt = trainer.checkpoint_path
    if ckpt.exists() and point_id is not None and (
            checkpoint_extra(ckpt).get("hooks", {}).get("point_id") != point_id):
        log.warning("%s belongs to another sweep's point: starting afresh", ckpt)
    elif ckpt.exists() and bool(point.training.resume):
        trainer.resume()
    start = trainer.step
    progress = hooks.progress
    # An attempt that died before its first checkpoint still counts: Slurm's restart count.
    where = slurm.attempt_from_env()
    progress.attempts = max(progress.attempts, int(where["restarts"])) + 1
    hooks.attempt = {"attempt": progress.attempts, "job_id": where["job_id"],
                     "array_index": where["array_index"], "nodes": where["nodes"],
                     "start": _now(), "first_step": start + 1}
    if env.is_main:
        logger.set_tags({"point.attempts": progress.attempts, NODELIST_TAG: where["nodes"],
                         **_attempt_tags(hooks.attempt)})
    # Timings come from one allocation: a resumed point repeats its warm-up and times all its
    # steps again here (on another node, perhaps); earlier attempts' numbers stay in their tags.
    total = start + int(s.warmup_steps) + int(s.steps)
    sampler = GpuSampler() if env.local_rank == 0 else None
    if sampler is not None:
        sampler.start()
    try:
        result = trainer.fit(make_loader, max_steps=total)
        if sampler is not None:
            sampler.sample()  # at least one sample, however short the point
    finally:
        if sampler is not None:
            sampler.stop()
    if env.is_main:
        logger.set_tags(_attempt_tags(progress.history[-1]))
    if trainer.stop_requested:
        raise _Stopped(trainer.stop_signum, trainer.step, ckpt, hooks.cause)

    comm_s, comm_bytes = _gradient_allreduce_s(model, device, int(s.comm_repeats))
    gather_s = _member_gather_s(model, plan, device, int(point.training.rollout),
                                int(s.comm_repeats))  # fmt: skip
    memory = result["peak_memory"]
    gpu = sampler.collect() if sampler else {}
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, {"rank": env.rank, "node": env.node_rank, "memory": memory,
                                      "gpu": gpu})
    median_s = result[M.STEP_S]
    summary = {k: result[k] for k in (M.STEP_S, M.STEP_P10_S, M.STEP_P90_S, M.STEP_SPREAD,
                                      M.SAMPLES_PER_S, M.MEASURED_STEPS, M.DATA_S)} | {
        M.COMM_S: comm_s + gather_s, M.COMM_BYTES_PER_STEP: float(comm_bytes),
        M.COMM_SHARE: (comm_s + gather_s) / median_s if median_s > 0 else 0.0,
        M.SAMPLES_PER_S_PER_GPU: result[M.SAMPLES_PER_S] / plan.gpus,
        # Data-parallel points exchange no halo.
        M.HALO_BYTES_PER_STEP: 0.0, M.HALO_ROWS_SENT: 0.0, **halo,
        M.MODEL_PARAMETERS: float(model.num_parameters()),
        M.MODEL_GFLOP_PER_SAMPLE: model.flops_per_sample() / 1e9,
    }  # fmt: skip
    if plan.members > 1:  # an ensemble: every sample is `members` forecasts
        summary |= {M.MEMBER_SAMPLES_PER_S: result[M.SAMPLES_PER_S] * plan.members,
                    M.MEMBER_SAMPLES_PER_S_PER_GPU: result[M.SAMPLES_PER_S] * plan.members
                    / plan.gpus, M.MEMBER_GATHER_S: gather_s}  # fmt: skip
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
                 median_s, summary[M.STEP_SPREAD], summary[M.SAMPLES_PER_S], comm_s)
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
            for p in build_plans(graph, model.runner.partition)]
    element = 2 if device.type == "cuda" else 4
    rows = max(sent)
    balance = partition_report(graph, model.runner.partition)
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
