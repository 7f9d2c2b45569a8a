"""The `ensemble` scaling experiment: members per GPU and GPUs per member swept, each point's
layout planned from the ensemble and model-parallel degrees, and its points run end to end."""

from __future__ import annotations

import pytest
from _scale_helpers import TINY, compose_scale, run_scale, sweep_state, table
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from squall.scaling.plan import LayoutError, plan_point


def _point(cfg, **values):
    """``cfg`` with the dotted keys of ``values`` set (one composition for every point)."""
    point = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(point, key.replace("__", "."), value)
    return point


def test_points_are_planned_from_members_per_gpu_and_gpus_per_member():
    cfg = compose_scale("cluster=h200", "experiment=ensemble", "model=o96_ens", hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert params == {"parallel.ensemble": "1,2,4", "parallel.model_parallel": "1,2"}
    plans = {}
    for ens in params["parallel.ensemble"].split(","):
        for mp in params["parallel.model_parallel"].split(","):
            plan = plan_point(_point(cfg, parallel__ensemble=int(ens),
                                     parallel__model_parallel=int(mp)))  # fmt: skip
            plans[plan.layout] = (plan.gpus, plan.members_per_gpu)
    # 4 members: 4, 2 or 1 per GPU, each member on 1 or 2 GPUs; one replica per point
    assert plans == {"dp1": (1, 4), "dp1xmp2": (2, 2), "dp1xens2": (2, 2),
                     "dp1xmp2xens2": (4, 1), "dp1xens4": (4, 1), "dp1xmp2xens4": (8, 0.5)}
    # members that do not split over the ensemble ranks, a deterministic model, a world that
    # the degrees do not divide: refused in one line
    with pytest.raises(LayoutError, match=r"model.ensemble.members=4 does not split over "
                       r"parallel.ensemble=3 ranks"):  # fmt: skip
        plan_point(_point(cfg, parallel__ensemble=3))
    with pytest.raises(LayoutError, match=r"members=1 does not split over parallel.ensemble=2"):
        plan_point(_point(cfg, parallel__ensemble=2, model__ensemble__members=1))
    with pytest.raises(LayoutError, match="parallel.gpus=6 is not a multiple of parallel."
                       "model_parallel=1 x parallel.ensemble=4"):  # fmt: skip
        plan_point(_point(cfg, parallel__gpus=6, parallel__ensemble=4, parallel__data_parallel=None))


@pytest.mark.slow  # one point of 2 gloo ranks: process start-up, ~30 s on 2 cores
def test_ensemble_sweep_runs_its_points(tmp_path):
    done = run_scale(["--multirun", "experiment=ensemble", "model=tiny_ens", *TINY,
                      "parallel.ensemble=2", "parallel.model_parallel=1"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = table(done.stdout)
    assert [(r["GPUs"], r["layout"], r["status"]) for r in rows] == [("2", "dp1xens2", "FINISHED")]
    assert float(rows[0]["member-samples/s"]) > 0
    state = sweep_state(done.stdout)
    metrics = MlflowClient(tracking_uri=state.tracking_uri).get_run(state.points["0"]).data.metrics
    # every sample is 4 member forecasts, 2 on each rank
    assert metrics["throughput/member_samples_per_s"] == pytest.approx(
        4 * metrics["throughput/samples_per_s"])
    assert 0 < metrics["time/member_gather_s"] <= metrics["time/comm_s"]
    assert {k for k in metrics if k.startswith("memory/peak_rss_GiB/rank")} == {
        "memory/peak_rss_GiB/rank0", "memory/peak_rss_GiB/rank1"}
