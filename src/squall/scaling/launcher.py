"""Hydra launchers for scaling sweeps: hydra-submitit-launcher's, with these changes.

1. **Per-point shape.** The stock launcher submits every job of a sweep as one array with the same
   resources, so a sweep over world sizes cannot work. Here each point's config is composed first,
   :func:`~squall.scaling.plan.plan_point` gives its nodes and tasks per node, and points of one
   shape go out as one job array (one Slurm task, and one GPU, per rank). Launcher settings that
   follow a swept key (``cluster.partition``, ``cluster.time_min``) apply per point.
2. **Bad points never launch.** A point whose layout cannot run (more GPUs than a node has, a
   world size the layout cannot split, a layout not supported yet) is recorded as failed with the
   reason and skipped; so is a shape ``sbatch`` refuses. The other points go on.
3. **Slurm decides when a point is over.** The driver follows its jobs with squeue/sacct
   (:mod:`squall.scaling.slurm`), waits for requeued attempts, reports pending reasons at once and
   cancels a point waiting cannot schedule after ``scale.pending_limit_s``; a live line counts
   points done, running and pending.
4. **Failures do not end the sweep.** A point that raises (its job then fails, non-zero exit), is
   killed, cancelled, runs out of memory or out of time is recorded with its reason and Slurm's
   state on its MLflow run, and handed to Hydra as a completed job whose return value is
   ``{"status": "failed" | "cancelled", "reason": ...}``, so the sweep's end callback still writes
   the report. A driver that stops early (Ctrl-C, SIGTERM, an error) cancels every job it
   submitted.
5. **Points are not timed side by side.** Whole nodes per point on clusters
   (``cluster.exclusive``); without, one point at a time (singleton dependency); the local
   launcher runs points one after another.

Requeue: a time-limit warning or a preemption reaches the point, which checkpoints and hands
over to submitit (:mod:`squall.scaling.point`), which requeues the job up to ``max_num_timeout``
times; a job Slurm requeued itself is left to Slurm; the point then resumes from its checkpoint
in the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from squall.errors import SquallError
from squall.progress import Progress
from squall.scaling import slurm
from squall.scaling.plan import PointPlan, plan_point
from squall.scaling.state import NODELIST_TAG, SLURM_STATE_TAG, SweepState, one_line
from squall.scaling.sweep import (
    abort_sweep,
    ensure_sweep,
    plan_point_run,
    record_end,
    record_failure,
)

log = logging.getLogger(__name__)

#: Lines of a failed job's stderr quoted in its failure reason.
STDERR_LINES = 3
#: Seconds between two looks at the sweep's jobs (one squeue and one sacct call for all of
#: them): a pending reason shows within seconds, and the controller sees 12 queries a minute.
POLL_S = 5.0
#: A job neither squeue nor sacct knows this long after its submission is taken as lost
#: (accounting lags behind sbatch by a second or two; MinJobAge is 300 s by default).
LOST_AFTER_S = 120.0
#: Launcher keys that are not per-point resources (submitit's folder and init-only settings).
NOT_PER_POINT = {"_target_", "submitit_folder", "max_num_timeout"}


def failed_point(reason: str) -> dict[str, str]:
    """Return value handed to Hydra for a point that failed."""
    return {"status": "failed", "reason": reason}


def _stderr_tail(job: Any) -> str:
    """Last meaningful lines of a job's (rank 0's) stderr, joined with `` | ``."""
    try:
        text = job.stderr() or ""
    except Exception:  # the log may be missing when the job never started
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # submitit's own bookkeeping lines say nothing about the cause.
    lines = [ln for ln in lines if "submitit" not in ln.lower()]
    return " | ".join(lines[-STDERR_LINES:])


class ShapedSweepLauncher(BaseSubmititLauncher):
    """Launch points grouped by shape; record failures; never raise for a failed point.

    Mixed into hydra-submitit-launcher's Local and Slurm launchers in
    :mod:`hydra_plugins.squall_scaling` (Hydra takes launchers from that namespace only).
    """

    #: Run points one after the other (local machine) instead of as one array per shape.
    serial_points = False

    def _shape_params(self, plan: PointPlan, uses_gpus: bool) -> dict[str, Any]:
        shape = {"nodes": plan.nodes, "tasks_per_node": plan.tasks_per_node}
        if uses_gpus:
            shape["gpus_per_node"] = plan.tasks_per_node
        return shape

    def _executor(self, shape: dict[str, Any], name: str, render_only: bool = False):
        """submitit executor for points of ``shape``; the batch script follows the cluster
        config (interpreter, exclusive nodes, binding, network): :mod:`squall.scaling.batch`."""
        from squall.scaling.batch import cluster_config, make_executor

        return make_executor(self._EXECUTOR, self.params, shape, name,
                             cluster_config(self.config), render_only=render_only)

    def sbatch_script(self, plan: PointPlan, uses_gpus: bool, name: str = "scale") -> str:
        """The batch script submitit would submit for a point of ``plan``'s shape (a single job;
        an array adds only ``--array``). Slurm launcher only, after :meth:`setup`; for checks
        and dry runs (no Slurm needed on this machine)."""
        from squall.scaling.batch import render_script

        return render_script(self._executor(self._shape_params(plan, uses_gpus), name,
                                            render_only=True))

    def _failed_return(self, overrides: list[str], idx: int, reason: str,
                       status: str = "failed") -> JobReturn:
        ret = JobReturn(overrides=overrides, working_dir=str(Path(str(self.config.hydra.sweep.dir))
                                                             / str(idx)),
                        task_name=str(self.config.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = failed_point(reason) | {"status": status}
        return ret

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Run one point in its job. A point that raised makes the job fail (non-zero exit, Slurm
        state FAILED) instead of returning Hydra's FAILED JobReturn, which submitit would record
        as a success; its reason is on its run already."""
        try:  # a result left by an earlier attempt of this (requeued) job is not this one's
            import submitit

            submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        except Exception:  # noqa: S110 - outside a submitit job there is nothing to forget
            pass
        ret = super().__call__(*args, **kwargs)
        if ret.status == JobStatus.FAILED and isinstance(ret._return_value, BaseException):
            raise ret._return_value
        return ret

    def _point_launcher_params(self, point_cfg) -> dict[str, Any]:
        """Launcher settings this point has of its own: a swept key the launcher config refers
        to (``cluster.partition``, ``cluster.time_min``, ``hydra.launcher.gres``, ...)."""
        if self._EXECUTOR != "slurm" or "hydra" not in point_cfg:
            return {}
        from omegaconf import OmegaConf

        own = OmegaConf.to_container(point_cfg.hydra.launcher, resolve=True)
        return {k: v for k, v in own.items()
                if k not in NOT_PER_POINT and self.params.get(k) != v}

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:  # noqa: D102
        assert self.config is not None and self.hydra_context is not None
        state = ensure_sweep(self.config)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        results: list[JobReturn | None] = [None] * len(job_overrides)
        groups: dict[str, list[_Point]] = {}
        shapes: dict[str, dict[str, Any]] = {}
        for pos, overrides in enumerate(job_overrides):
            idx, overrides = initial_job_idx + pos, list(overrides)
            shown = " ".join(filter_overrides(overrides))
            point_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            try:
                plan = plan_point(point_cfg)
            except SquallError as err:
                plan, reason = None, str(err)
            name = f"{plan.layout} gpus={plan.gpus}" if plan else "not launched"
            gpus = point_cfg.parallel.get("gpus")
            run_id = plan_point_run(state, idx, overrides, f"#{idx} {name} {shown}".strip(),
                                    gpus=gpus if isinstance(gpus, int) else None)
            if plan is None:
                log.error("\t#%d : %s -- NOT LAUNCHED: %s", idx, shown, reason)
                record_failure(state, run_id, reason)
                results[pos] = self._failed_return(overrides, idx, reason)
                continue
            log.info("\t#%d : %s (%s, %d node(s) x %d)", idx, shown, plan.layout, plan.nodes,
                     plan.tasks_per_node)
            shape = self._shape_params(plan, str(point_cfg.cluster.get("device")) == "cuda")
            shape.update(self._point_launcher_params(point_cfg))
            key = json.dumps(shape, sort_keys=True, default=str)
            shapes[key] = shape
            groups.setdefault(key, []).append(
                _Point(pos, idx, overrides, run_id, f"{self.config.hydra.job.name}-{plan.gpus}g"))

        submitted: list[_Point] = []
        try:
            with _sigterm_aborts():
                self._submit(state, groups, shapes, submitted, results)
                if not self.serial_points:
                    self._wait(state, submitted, results)
        except BaseException as err:
            self._abort(state, submitted, results, err)
            raise
        return results  # type: ignore[return-value]

    def _shared_nodes(self) -> bool:
        """Whether points may land on one node together (``cluster.exclusive=false``)."""
        from squall.scaling.batch import batch_settings, cluster_config

        return not batch_settings(cluster_config(self.config), self._EXECUTOR).exclusive

    def _submit(self, state: SweepState, groups: dict[str, list[_Point]],
                shapes: dict[str, dict[str, Any]], submitted: list[_Point],
                results: list) -> None:
        """Submit every shape's points as one array (one job at a time on the local machine).

        On a cluster with whole nodes per point every shape goes out at once. Without
        (``cluster.exclusive=false``) points could be timed side by side on one node, so every
        job of the sweep gets one name and ``--dependency=singleton``, and each array runs one
        task at a time (``%1``): Slurm runs one point at a time.
        A shape Slurm refuses (``sbatch: error: ...``) fails its points with that reason.
        """
        serialise = self._EXECUTOR == "slurm" and self._shared_nodes()
        for key, members in groups.items():
            shape = dict(shapes[key])
            name = members[0].name
            if serialise:
                name = f"{self.config.hydra.job.name}-{Path(state.sweep_dir).name}"
                extra = dict(shape.get("additional_parameters")
                             or self.params.get("additional_parameters") or {})
                shape["additional_parameters"] = {**extra, "dependency": "singleton"}
                shape["array_parallelism"] = 1  # singleton does not order one array's tasks
            executor = self._executor(shape, name)
            for chunk in [[m] for m in members] if self.serial_points else [members]:
                args = [(m.overrides, "hydra.sweep.dir", m.idx, f"job_id_for_{m.idx}",
                         Singleton.get_state()) for m in chunk]
                try:
                    jobs = executor.map_array(self, *zip(*args, strict=True))
                except Exception as err:  # sbatch refused: invalid gres, memory over the limit
                    reason = f"submission refused: {_refusal(err)}"
                    for m in chunk:
                        log.error("point #%d not submitted: %s", m.idx, reason)
                        record_end(state, m.run_id, "FAILED", reason,
                                   {SLURM_STATE_TAG: "REFUSED"})
                        results[m.pos] = self._failed_return(m.overrides, m.idx, reason)
                    continue
                for m, job in zip(chunk, jobs, strict=True):
                    m.job, m.job_id, m.submitted_at = job, str(job.job_id), time.monotonic()
                    submitted.append(m)
                    log.info("point #%d submitted as job %s", m.idx, m.job_id)
                if self.serial_points:
                    for m in chunk:
                        results[m.pos] = self._collect(state, m)
                        m.done = True

    def _wait(self, state: SweepState, points: list[_Point], results: list) -> None:
        """Follow the sweep's jobs in Slurm until every one has ended; collect each as it ends.

        A live line counts points done, running and pending (with Slurm's reasons). A point
        pending for a reason that waiting cannot clear is reported at once and cancelled after
        ``scale.pending_limit_s``. Requeued jobs are waited for: only Slurm's end counts.
        """
        limit = self.config.scale.get("pending_limit_s") if "scale" in self.config else None
        limit = None if limit is None else float(limit)
        left = {p.job_id: p for p in points}
        total = len(results)
        bar = Progress(total, "sweep", unit="point")
        bar.update(total - len(left))
        last = ""
        try:
            while left:
                try:
                    seen = slurm.query_jobs(list(left))
                except slurm.SlurmUnavailable as err:
                    log.warning("cannot ask Slurm about the sweep's jobs: %s", err)
                    seen = {}
                now = time.monotonic()
                counts: Counter = Counter()
                reasons: Counter = Counter()
                ended = 0
                for job_id, p in list(left.items()):
                    info = seen.get(job_id)
                    if info is None:
                        if now - p.submitted_at < LOST_AFTER_S:
                            continue
                        info = slurm.JobInfo(state="UNKNOWN", active=False,
                                             reason="Slurm does not know the job any more")
                    if info.active:
                        counts[info.state] += 1
                        if info.state == "PENDING":
                            reasons[info.reason.split(",")[0]] += 1
                            self._check_pending(p, info, now, limit)
                        continue
                    del left[job_id]
                    results[p.pos] = self._finish(state, p, info)
                    p.done = True
                    ended += 1
                running = sum(n for st, n in counts.items() if st != "PENDING")
                why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
                line = (f"{total - len(left)}/{total} done, {running} running, "
                        f"{counts['PENDING']} pending" + (f" ({why})" if why else ""))
                bar.set_postfix(line.split(", ", 1)[1])
                bar.update(ended)
                if line != last:  # every change on its own line, as it happens
                    log.info("sweep: %s", line)
                    last = line
                if left:
                    time.sleep(POLL_S)
        finally:
            bar.close()

    def _check_pending(self, p: _Point, info: slurm.JobInfo, now: float,
                       limit: float | None) -> None:
        """Report a pending reason waiting cannot clear; cancel the job past ``limit``."""
        reason = info.reason.split(",")[0]
        if reason not in slurm.UNSCHEDULABLE:
            p.unschedulable_since = None
            return
        if p.unschedulable_since is None:
            p.unschedulable_since = now
            log.warning("point #%d (job %s) cannot be scheduled: PENDING (%s)%s", p.idx,
                        p.job_id, info.reason,
                        f"; cancelled after scale.pending_limit_s={limit:g}" if limit is not None
                        else "; waiting (scale.pending_limit_s=null)")
        if limit is not None and now - p.unschedulable_since >= limit and not p.cancelled_by_us:
            p.cancelled_by_us = (f"unschedulable: pending {now - p.unschedulable_since:.0f} s "
                                 f"with reason {info.reason}; cancelled by the sweep after "
                                 f"scale.pending_limit_s={limit:g}")
            log.error("point #%d (job %s): %s", p.idx, p.job_id, p.cancelled_by_us)
            slurm.cancel([p.job_id])

    def _finish(self, state: SweepState, p: _Point, info: slurm.JobInfo) -> JobReturn:
        """The point's JobReturn once Slurm shows its job ended; its truth on its run."""
        attempts = slurm.job_attempts(p.job_id)
        tags = {SLURM_STATE_TAG: info.state, "slurm.job_id": p.job_id,
                "slurm.exit_code": info.exit_code or "-", "slurm.attempts": len(attempts)}
        if info.nodes and info.nodes not in ("None", "None assigned"):
            tags[NODELIST_TAG] = info.nodes
        for n, a in enumerate(attempts, 1):
            tags.update({f"attempt.{n}.slurm_state": a["state"], f"attempt.{n}.slurm_nodes":
                         a["nodes"], f"attempt.{n}.slurm_start": a["start"],
                         f"attempt.{n}.slurm_end": a["end"]})
        outcome, value = _result(p.job)
        if info.state == "COMPLETED" and outcome == "success":
            record_end(state, p.run_id, "FINISHED", tags=tags)
            log.info("point #%d (job %s) COMPLETED on %s", p.idx, p.job_id, info.nodes)
            return value
        if info.state == "CANCELLED":
            reason = p.cancelled_by_us or f"cancelled in Slurm (job {p.job_id} CANCELLED)"
            status = "FAILED" if p.cancelled_by_us else "KILLED"
        else:
            detail = (value if outcome == "error" else "") or _stderr_tail(p.job)
            reason = (f"job {p.job_id} ended {info.state} (exit {info.exit_code or '?'})"
                      + (f": {detail}" if detail else ""))
            status = "FAILED"
        record_end(state, p.run_id, status, reason, tags)
        log.error("point #%d %s: %s", p.idx, "cancelled" if status == "KILLED" else "failed",
                  reason)
        return self._failed_return(p.overrides, p.idx, reason,
                                   "cancelled" if status == "KILLED" else "failed")

    def _abort(self, state: SweepState, submitted: list[_Point], results: list,
               err: BaseException) -> None:
        """The driver stops early: cancel every job it submitted that has not ended, mark
        their runs and the sweep's parent run KILLED."""
        why = f"sweep aborted ({type(err).__name__}{': ' + str(err) if str(err) else ''})"
        open_points = [p for p in submitted if not p.done]
        if self._EXECUTOR == "slurm":
            slurm.cancel([p.job_id for p in open_points])
        else:
            for p in open_points:
                try:
                    p.job.cancel(check=False)
                except Exception:  # noqa: S110 - it may have ended in between
                    pass
        log.error("%s: cancelled %d job(s): %s", why, len(open_points),
                  " ".join(p.job_id for p in open_points) or "-")
        for p in open_points:
            record_end(state, p.run_id, "KILLED", why)
        abort_sweep(state, why)

    def _collect(self, state, p: _Point) -> JobReturn:
        """Rank 0's JobReturn of a finished local point; a failure recorded, turned into a value."""
        try:
            ret = p.job.results()[0]
        except Exception as err:  # raised, killed, out of memory: no result, or an error
            traceback = _traceback_reason(str(err))
            tail = traceback or _stderr_tail(p.job)
            reason = (f"job {p.job_id} ended {p.job.state}"
                      + (f": {tail}" if tail else f" without a result ({type(err).__name__})"))
            record_failure(state, p.run_id, reason)
            log.error("point #%d failed: %s", p.idx, reason)
            return self._failed_return(p.overrides, p.idx, reason)
        if ret.status == JobStatus.FAILED:
            reason = one_line(ret._return_value)
            record_failure(state, p.run_id, reason)
            log.error("point #%d failed: %s", p.idx, reason)
            ret.status, ret.return_value = JobStatus.COMPLETED, failed_point(reason)
        else:
            record_end(state, p.run_id, "FINISHED")
        return ret


@dataclass
class _Point:
    """One launched point while the sweep follows it."""

    pos: int
    idx: int
    overrides: list[str]
    run_id: str | None
    name: str
    job: Any = None
    job_id: str = ""
    submitted_at: float = 0.0
    unschedulable_since: float | None = None
    cancelled_by_us: str = ""
    done: bool = False


class SweepAborted(KeyboardInterrupt):
    """The sweep driver got SIGTERM (e.g. its own job was cancelled)."""


class _sigterm_aborts:  # noqa: N801 - used as a context manager
    """While submitting and waiting, SIGTERM stops the driver like Ctrl-C (its jobs are then
    cancelled); the previous handler is restored afterwards."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, _frame):
        raise SweepAborted(f"signal {signal.Signals(signum).name}")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _refusal(err: BaseException) -> str:
    """sbatch's own error line(s) from a failed submission."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() and "sbatch" in ln.lower()]
    return " | ".join(errors or lines[-1:]) or type(err).__name__


def _traceback_reason(text: str) -> str:
    """``Type: message`` of the exception a point's traceback ends with ('' if none)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head and head.replace(".", "").replace("_", "").isalnum() and head[0].isupper() \
                and ":" in ln:
            return ln
    return ""


def _result(job) -> tuple[str, Any]:
    """Rank 0's result file of an ended job: ``("success", JobReturn)``, ``("error", reason)``
    or ``("missing", None)``; read only once Slurm shows the job ended."""
    from submitit.core.utils import pickle_load

    try:
        outcome, value = pickle_load(job.paths.result_pickle)
    except Exception:  # never written (killed, cancelled, requeue pending) or unreadable
        return "missing", None
    if outcome == "error":
        return "error", _traceback_reason(str(value))
    return outcome, value
