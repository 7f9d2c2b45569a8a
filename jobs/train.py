"""Train a forecaster on the configured graph and dataset (a synthetic one is generated if none).

    python -m jobs.train                                   # embedded defaults: CPU, tiny model
    python -m jobs.train graph=o96_l6 model=o96 training.max_steps=1000
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m jobs.train

Resumes from ``training.run_dir/checkpoint.pt`` when it exists (``training.resume=false`` starts
afresh). SIGTERM or SIGUSR1 (Slurm's warning before the time limit) checkpoints and stops cleanly.

Several processes (``srun`` with one task per GPU, jobs/slurm/train.sbatch, or submitit) train one
model together: ``parallel.model_parallel`` ranks share each sample's graph (halo exchange), the
remaining factor of the world size are data-parallel replicas. Only rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from jobs._entry import user_errors
from squall.parallel.env import destroy_distributed, dist_env, init_distributed
from squall.tracking import create_logger
from squall.train.runner import train

log = logging.getLogger("jobs.train")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@user_errors
def main(cfg: DictConfig) -> dict:
    env = dist_env()
    init_distributed(env)
    if env.backend == "nccl":  # one GPU per rank
        cfg.training.device = f"cuda:{env.local_rank}"
    store = Path(cfg.paths.cache) / "mlflow"
    run_name = f"train-{cfg.graph.name}-{cfg.model.name}"
    try:
        with create_logger(cfg.tracking, store_dir=store, rank=env.rank, run_name=run_name,
                           tags={"job": "train", "world_size": env.world_size}) as logger:  # fmt: skip
            logger.log_config(cfg)
            summary = train(cfg, logger)
            losses = summary.pop("losses")
            final = {
                k: v
                for k, v in summary.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            logger.log_metrics(final, summary["step"])
    finally:
        destroy_distributed()
    if env.rank == 0:
        if losses:
            log.info("loss %.4g -> %.4g over %d steps", losses[0], losses[-1], len(losses))
        log.info("checkpoint: %s (a later run resumes from it; training.resume=false starts "
                 "over and replaces it)", Path(str(cfg.training.run_dir)) / "checkpoint.pt")  # fmt: skip
        if logger.run_id:
            mlflow_cli = Path(sys.executable).parent / "mlflow"
            log.info("MLflow run %s in %s (browse: %s ui --backend-store-uri %s --host 127.0.0.1)",
                     logger.run_id, logger.tracking_uri, mlflow_cli, logger.tracking_uri)  # fmt: skip
        print(json.dumps({"summary": final}))
    return final


if __name__ == "__main__":
    main()
