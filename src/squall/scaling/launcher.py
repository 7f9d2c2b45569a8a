"""Hydra launchers for scaling sweeps: hydra-submitit-launcher's, with three changes.

1. **Per-point shape.** The stock launcher submits every job of a sweep as one array with the same
   resources, so a sweep over world sizes cannot work. Here each point's config is composed first,
   :func:`~squall.scaling.plan.plan_point` gives its nodes and tasks per node, and points of one
   shape go out as one job array (one Slurm task, and one GPU, per rank).
2. **Bad points never launch.** A point whose layout cannot run (more GPUs than a node has, a
   world size the layout cannot split, a layout not supported yet) is recorded as failed with the
   reason and skipped; the other points go on.
3. **Failures do not end the sweep.** A point that raises, is killed, runs out of memory or out of
   time (past its requeues) is recorded as failed with its reason on its MLflow run, and handed to
   Hydra as a completed job whose return value is ``{"status": "failed", "reason": ...}``, so the
   sweep's end callback still writes the report. Nothing recorded by the point is lost.

Requeue after a timeout or preemption is submitit's: its signal reaches the point, which
checkpoints and hands over to submitit (:mod:`squall.scaling.point`), which requeues the job up to
``max_num_timeout`` times; the point then resumes from its checkpoint in the same MLflow run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

from squall.errors import SquallError
from squall.scaling.plan import PointPlan, plan_point
from squall.scaling.sweep import ensure_sweep, plan_point_run, record_failure

log = logging.getLogger(__name__)

#: Lines of a failed job's stderr quoted in its failure reason.
STDERR_LINES = 3


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

    def _failed_return(self, overrides: list[str], idx: int, reason: str) -> JobReturn:
        ret = JobReturn(overrides=overrides, working_dir=str(Path(str(self.config.hydra.sweep.dir))
                                                             / str(idx)),
                        task_name=str(self.config.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = failed_point(reason)
        return ret

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:  # noqa: D102
        assert self.config is not None and self.hydra_context is not None
        state = ensure_sweep(self.config)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        results: list[JobReturn | None] = [None] * len(job_overrides)
        groups: dict[tuple, list[tuple]] = defaultdict(list)
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
            groups[tuple(sorted(shape.items()))].append(
                (pos, idx, overrides, run_id, f"{self.config.hydra.job.name}-{plan.gpus}g"))

        # One point at a time where points share the machine (timings must not overlap); on a
        # cluster each point has its own nodes: every shape goes out at once, one array each.
        pending = []
        for shape, members in groups.items():
            executor = self._executor(dict(shape), members[0][4])
            for chunk in [[m] for m in members] if self.serial_points else [members]:
                args = [(m[2], "hydra.sweep.dir", m[1], f"job_id_for_{m[1]}",
                         Singleton.get_state()) for m in chunk]
                jobs = executor.map_array(self, *zip(*args, strict=True))
                pending.extend(zip(chunk, jobs, strict=True))
                if self.serial_points:
                    for member, job in pending:
                        results[member[0]] = self._collect(state, member, job)
                    pending.clear()
        for member, job in pending:
            results[member[0]] = self._collect(state, member, job)
        return results  # type: ignore[return-value]

    def _collect(self, state, member: tuple, job) -> JobReturn:
        """Rank 0's JobReturn of a finished point; a failure recorded and turned into a value."""
        _, idx, overrides, run_id, _ = member
        try:
            ret = job.results()[0]
        except Exception as err:  # killed, out of memory, out of time: no result pickle
            tail = _stderr_tail(job)
            reason = (f"job {job.job_id} ended {job.state} without a result"
                      + (f": {tail}" if tail else f" ({type(err).__name__})"))
            record_failure(state, run_id, reason)
            log.error("point #%d failed: %s", idx, reason)
            return self._failed_return(overrides, idx, reason)
        if ret.status == JobStatus.FAILED:
            from squall.scaling.point import one_line

            reason = one_line(ret._return_value)
            record_failure(state, run_id, reason)
            log.error("point #%d failed: %s", idx, reason)
            ret.status, ret.return_value = JobStatus.COMPLETED, failed_point(reason)
        return ret
