"""Validate a layout before spending GPU hours: partition, halo plans and model on one CPU process,
then per-rank memory and communication estimates (nothing runs on a GPU). With a cluster
(``--config-name scale``), also the scaling model's projection from 1 to 1,024 GPUs and the
layout it chooses for ``parallel.gpus``.

    python -m jobs.dry_run --config-name scale cluster=h200 graph=o1280_l8 model=o96 \\
        parallel.gpus=64
    python -m jobs.dry_run --config-name scale cluster=h100 graph=o320_l7 model=o96 \\
        parallel.gpus=8 parallel.model_parallel=4
    python -m jobs.dry_run graph=o96_l6 model=o96 parallel.model_parallel=2

World size: ``parallel.gpus`` when set (the scaling job's key), else ``parallel.ensemble x
parallel.model_parallel``. Batch per model group: ``training.batch_size`` samples; an ensemble
model (``model.ensemble.members``) runs ``members / parallel.ensemble`` of each sample's members
per rank and gathers the rest (bytes per step in the table). Degree errors print every number.

Projection (``cluster.calibration`` names the one-GPU run it is calibrated on; squall.planning.
scaling): strong scaling at the global batch ``scale.batch`` of ``scale.mode=strong``, weak
scaling at one sample per model group, the memory budget ``model.checkpoint.budget_gib`` (else
the GPU's memory). Options: ``+scale.projection_gpus='[1,2,4]'``, ``+scale.projection_budget_gib=
40``, ``+scale.projection_plot=path.png`` (default under ``paths.cache``/dry_run),
``+scale.projection=false``. A cluster without ``cluster.calibration`` (``local``) gets the
estimate only.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jobs._entry import hydra_job
from squall.errors import ConfigError
from squall.graphs import load_or_build
from squall.models.forecaster import ModelConfig
from squall.parallel.parallelize import ParallelConfig
from squall.planning.estimate import estimate, format_estimate
from squall.planning.scaling import PROJECTION_GPUS, project_scaling


def projection(cfg: DictConfig, graph, mcfg: ModelConfig, world: int) -> str:
    """The scaling model's tables, plot and the layout chosen for ``world`` GPUs."""
    scale = cfg.get("scale") or {}
    given = scale.get("projection_gpus")
    gpus = tuple(int(g) for g in (OmegaConf.to_object(given) if given else PROJECTION_GPUS))
    if world not in gpus:
        gpus = tuple(sorted({*gpus, world}))
    plot = scale.get("projection_plot") or str(
        Path(cfg.paths.cache) / "dry_run" / f"scaling_{graph.name}_{cfg.cluster.name}.png"
    )
    strong = scale.get("batch") if scale.get("mode", "strong") == "strong" else None
    text, curves = project_scaling(
        cfg.cluster, graph, mcfg, gpus=gpus, strong_batch=strong,
        budget_gib=scale.get("projection_budget_gib"), plot=plot,
        graph_cache=cfg.paths.cache + "/graphs",
    )  # fmt: skip
    chosen = [p for p in curves["strong"] if not isinstance(p, str) and p.gpus == world]
    if chosen:
        p = chosen[0]
        text += (f"\nchosen for parallel.gpus={world} (strong scaling): {p.layout} on {p.nodes} "
                 f"node(s), {p.step_s:.4f} s/step, {p.peak_gib:.2f} GiB per rank, "
                 f"checkpointing {p.plan}")  # fmt: skip
    return text


@hydra_job()
def main(cfg: DictConfig) -> None:
    pcfg = ParallelConfig.from_cfg(cfg.parallel)
    world = cfg.parallel.gpus or pcfg.model_parallel * pcfg.ensemble
    graph = load_or_build(cfg.graph, cfg.paths.cache + "/graphs")
    mcfg = ModelConfig.from_cfg(cfg.model)
    batch = cfg.training.batch_size
    scale = cfg.get("scale") or {}
    # config.yaml has no cluster (an empty group); scale.yaml composes one
    project = bool(cfg.get("cluster")) and scale.get("projection") is not False
    try:
        layout, ranks, params, planned = estimate(graph, mcfg, pcfg, world, batch,
                                                  rollout=cfg.training.rollout,
                                                  members=mcfg.ensemble_members)  # fmt: skip
        print(format_estimate(layout, ranks, params, graph, planned, pcfg, batch))
        print(graph.in_degree_report())
    except ConfigError as err:
        if not project:
            raise
        # the projection below says which layout does fit
        print(f"this layout does not fit: {err}")
    if not project:
        return
    if not cfg.cluster.get("calibration"):
        print(f"\nno projection: cluster {cfg.cluster.get('name')} names no cluster.calibration "
              "(a one-GPU run to take the FLOP rates from; see conf/cluster/h200.yaml)")  # fmt: skip
        return
    print()
    print(projection(cfg, graph, mcfg, world))


if __name__ == "__main__":
    main()
