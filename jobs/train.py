"""Train a forecaster on the configured graph and dataset (a synthetic one is generated if none).

    python -m jobs.train                                   # embedded defaults: CPU, tiny model
    python -m jobs.train graph=o96_l6 model=o96 training.max_steps=1000
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m jobs.train

Resumes from ``training.run_dir/checkpoint.pt`` when it exists (``training.resume=false`` starts
afresh), in the same MLflow run: its metrics continue at the checkpoint's step.

Before the first step every chunk of the dataset's training and validation times is checked
(present, and as long as its header says); a missing or damaged chunk, like any bad input, ends
the job with one line ``error: ...`` and exit status 2.

Exit status
-----------
0
    Trained to ``training.max_steps``; the MLflow run is ``FINISHED``.
2
    Bad input (config, dataset, checkpoint): one line ``error: ...``; the run is ``FAILED``.
75 (:data:`squall.train.signals.STOPPED_EXIT_CODE`)
    Stopped by SIGTERM (``scancel``, preemption, ``kill``) or SIGUSR1 (Slurm's warning before the
    time limit). During training the step finishes and a checkpoint is written; during start-up
    (graph, dataset generation, model build) the job stops at once. The run is ``KILLED`` with the
    tags ``squall.stop_signal`` and ``squall.resumable=true``: running the same command again
    continues it.

Several processes (``srun`` with one task per GPU, jobs/slurm/train.sbatch, or submitit) train one
model together: ``parallel.model_parallel`` ranks share each sample's graph (halo exchange), the
remaining factor of the world size are data-parallel replicas. Only rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from jobs._entry import distributed_job, hydra_job
from squall.data.setup import check_source
from squall.distributed.env import dist_env
from squall.tracking.metrics import VALIDATION_METRICS
from squall.train.runner import end_attempt, open_tracking_run, train
from squall.train.signals import STOPPED_EXIT_CODE, Stopped, StopSignals, signal_name

log = logging.getLogger("jobs.train")


@hydra_job()
def main(cfg: DictConfig) -> dict:
    # Installed first: a stop during start-up must still end the MLflow run as KILLED.
    with StopSignals() as stop:
        try:
            final, stopped_by, logger = run(cfg, stop)
        except Stopped as err:
            log.warning("stopped by %s during start-up (exit status %d)", signal_name(err.signum),
                        STOPPED_EXIT_CODE)  # fmt: skip
            sys.exit(STOPPED_EXIT_CODE)
    if dist_env().rank != 0:  # rank 0 reports
        if stopped_by is not None:
            sys.exit(STOPPED_EXIT_CODE)
        return final
    checkpoint = Path(str(cfg.training.run_dir)) / "checkpoint.pt"
    if logger.run_id:
        mlflow_cli = Path(sys.executable).parent / "mlflow"
        log.info("MLflow run %s in %s (browse: %s ui --backend-store-uri %s --host 127.0.0.1)",
                 logger.run_id, logger.tracking_uri, mlflow_cli, logger.tracking_uri)  # fmt: skip
    if stopped_by is not None:
        log.warning("stopped by %s at step %d; checkpoint %s: run the same command again to "
                    "continue (exit status %d)", stopped_by, final["step"], checkpoint,
                    STOPPED_EXIT_CODE)  # fmt: skip
        print(json.dumps({"summary": final, "stopped_by": stopped_by}))
        sys.exit(STOPPED_EXIT_CODE)
    log.info("checkpoint: %s (a later run resumes from it; training.resume=false starts over "
             "and replaces it)", checkpoint)  # fmt: skip
    print(json.dumps({"summary": final}))
    return final


def run(cfg: DictConfig, stop: StopSignals):
    """Train in this job's MLflow run; return the final metrics, the stop signal's name (None
    when trained to the end) and the logger."""
    with distributed_job(cfg) as env:
        # A missing dataset is bad input: said before a tracking run is opened (or continued).
        check_source(cfg)
        with stop.deferred():  # a stop while the run is created ends it after, as KILLED
            logger, _ = open_tracking_run(cfg, Path(cfg.paths.cache) / "mlflow", env.rank,
                                          env.world_size)  # fmt: skip
        with logger:
            try:
                summary = train(cfg, logger)
            except Stopped as err:
                name = signal_name(err.signum)
                end_attempt(logger, cfg, "KILLED", f"stopped by {name} during start-up",
                            signal_name=name, resumable=True)  # fmt: skip
                raise
            except KeyboardInterrupt:
                end_attempt(logger, cfg, "KILLED", "interrupted (SIGINT) without a checkpoint")
                raise
            except Exception as err:
                first = (str(err).strip().splitlines() or [""])[0]
                end_attempt(logger, cfg, "FAILED", f"failed: {type(err).__name__}: {first}")
                raise
            losses = summary.pop("losses")
            stopped_by = summary.pop("stopped_by") if summary["stopped_early"] else None
            final = {
                k: v
                for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            # Validation metrics were logged at the step they were measured; the step is the
            # metrics' own step, not a metric.
            logger.log_metrics({k: v for k, v in final.items()
                                if k not in VALIDATION_METRICS and k != "step"},
                               summary["step"])  # fmt: skip
            if losses and env.rank == 0:
                log.info("loss %.4g -> %.4g over %d steps", losses[0], losses[-1], len(losses))
            if stopped_by is not None:
                end_attempt(logger, cfg, "KILLED",
                            f"stopped by {stopped_by} at step {summary['step']} after writing "
                            "its checkpoint: run again with the same training.run_dir to continue",
                            step=summary["step"], signal_name=stopped_by, resumable=True)  # fmt: skip
            else:
                end_attempt(logger, cfg, "FINISHED", f"finished at step {summary['step']}",
                            step=summary["step"])  # fmt: skip
    return final, stopped_by, logger


if __name__ == "__main__":
    main()
