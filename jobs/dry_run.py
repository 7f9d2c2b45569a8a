"""Validate a layout before spending GPU hours: partition, halo plans and model on one CPU process,
then per-rank memory and communication estimates (nothing runs on a GPU).

    python -m jobs.dry_run --config-name scale graph=o320_l7 model=o96 \\
        parallel.gpus=8 parallel.model_parallel=4
    python -m jobs.dry_run graph=o96_l6 model=o96 parallel.model_parallel=2

World size: ``parallel.gpus`` when set (the scaling job's key), else ``parallel.model_parallel``.
Batch per model group: ``training.batch_size``. Degree errors print every number.
"""

from __future__ import annotations

from omegaconf import DictConfig

from jobs._entry import hydra_job
from squall.graphs import load_or_build
from squall.models.forecaster import ModelConfig
from squall.parallel.parallelize import ParallelConfig
from squall.planning.estimate import estimate, format_estimate


@hydra_job()
def main(cfg: DictConfig) -> None:
    pcfg = ParallelConfig.from_cfg(cfg.parallel)
    world = cfg.parallel.gpus or pcfg.model_parallel
    batch = cfg.training.batch_size
    graph = load_or_build(cfg.graph, cfg.paths.cache + "/graphs")
    mcfg = ModelConfig.from_cfg(cfg.model)
    layout, ranks, params, mcfg = estimate(graph, mcfg, pcfg, world, batch,
                                           rollout=cfg.training.rollout)  # fmt: skip
    print(format_estimate(layout, ranks, params, graph, mcfg, pcfg, batch))


if __name__ == "__main__":
    main()
