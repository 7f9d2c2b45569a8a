"""One point of a scaling experiment; ``--multirun`` sweeps points and prints the scaling table.

    python -m jobs.scale --multirun                              # 1 and 2 CPU ranks, tiny model
    python -m jobs.scale --multirun experiment=kernel_compare
    python -m jobs.scale --multirun cluster=h100 experiment=strong_scaling graph=o96_l6 model=o96 \
        cluster.partition=gpu cluster.account=myproject
    python -m jobs.scale                                         # one point, one process

Each point warms up, times ``scale.steps`` training steps and records throughput, step time and
its spread, every rank's peak memory, communication and the run environment in MLflow (one child
run per point under the sweep's parent run). At the end of a multirun the report (``jobs.report``)
is written to ``<sweep dir>/report`` and the parent run, and its table printed. See
``conf/scale.yaml`` for the knobs.
"""

from __future__ import annotations

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from jobs._entry import hydra_job
from squall.scaling.point import run_point
from squall.scaling.sweep import STATE_FILE, SweepState, point_logger


@hydra_job("scale")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    job_num = int(hc.job.num) if multirun else None
    sweep_dir = str(hc.sweep.dir) if multirun else None

    def logger_factory(env, plan):
        name = f"{plan.layout} gpus={plan.gpus} {cfg.graph.name}/{cfg.model.name}"
        return point_logger(cfg, job_num, sweep_dir, name)

    point_id = None
    if multirun and (Path(sweep_dir) / STATE_FILE).exists():
        point_id = f"{SweepState.load(sweep_dir).sweep_id}#{job_num}"
    summary = run_point(cfg, logger_factory, point_id)
    if not multirun and summary:  # rank 0 only
        keys = ("time/step_s", "time/step_spread", "throughput/samples_per_s", "time/comm_s")
        print(json.dumps({"point": {k: summary[k] for k in keys if k in summary}}))
    return {"status": "ok", **summary}


if __name__ == "__main__":
    main()
