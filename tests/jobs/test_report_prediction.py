"""The scaling model's prediction beside each measured point of the scaling report: present and
the model's own numbers when the sweep has a one-rank point, absent with the reason otherwise, and
never at the cost of the measured report."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
from _scale_helpers import TINY, compose_scale
from omegaconf import OmegaConf, open_dict

from squall.graphs import load_or_build
from squall.planning.scaling import ClusterSpec, ScalingModel, calibrate, load_calibration
from squall.scaling.report import report_sweep
from squall.scaling.sweep import SweepState, plan_point_run
from squall.tracking import MlflowLogger, local_store_uri, start_sweep_parent
from squall.tracking import metrics as M

BATCH = 2  # conf/cluster/local.yaml's strong_scaling_batch


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    """The resolved config of a tiny point on cluster=local (as a point logs it), its graph in a
    cache of its own."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = compose_scale("cluster=local", *TINY, f"paths.cache={cache}",
                        f"training.run_dir={cache / 'run'}")  # fmt: skip
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def _sweep(tmp_path: Path, schema_db: Path) -> SweepState:
    (tmp_path / "mlruns").mkdir()
    shutil.copy(schema_db, tmp_path / "mlruns" / "mlflow.db")
    uri = local_store_uri(tmp_path)
    parent = start_sweep_parent("s-pred", uri=uri, experiment="scaling", store_dir=tmp_path)
    state = SweepState("s-pred", str(tmp_path / "sweep"), uri, "scaling", parent.experiment_id,
                       parent.run_id, title="strong_scaling on local")  # fmt: skip
    state.save()
    return state


def _point(state, job, cfg, gpus, mp, step_s, memory=M.PEAK_RSS_GIB, config="log") -> str:
    """A finished point of ``gpus`` ranks as ``mp`` model-parallel ranks x data-parallel that
    measured ``step_s``; ``config``: ``log`` its config (params and config.yaml), ``none``, or
    the text of a config.yaml that is not YAML."""
    run_id = plan_point_run(state, job, [f"parallel.gpus={gpus}"], f"#{job}", gpus=gpus)
    point = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(point):
        point.parallel.gpus, point.parallel.model_parallel = gpus, mp
    dp = gpus // mp
    with MlflowLogger(uri=state.tracking_uri, experiment="scaling", run_id=run_id,
                      log_environment=False) as run:  # fmt: skip
        if config == "log":
            run.log_config(point)
        elif config != "none":
            path = Path(state.sweep_dir) / "config.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(config)
            run.log_artifact(path)
        run.log_params({"point.gpus": gpus, "point.nodes": 1, "point.model_parallel": mp,
                        "point.data_parallel": dp, "point.batch_per_rank": BATCH // dp,
                        "point.global_batch": BATCH,
                        "point.layout": f"dp{dp}" + (f"xmp{mp}" if mp > 1 else "")})  # fmt: skip
        run.log_metrics({M.STEP_S: step_s, M.SAMPLES_PER_S: BATCH / step_s, M.STEP_SPREAD: 0.01,
                         memory: 0.2 * gpus}, step=4)  # fmt: skip
    return run_id


@pytest.mark.slow  # builds the graph, calibrates and draws: 11 s on 2 loaded cores
def test_prediction_is_the_models_own_beside_each_measured_point(base_cfg, tmp_path,
                                                                 mlflow_schema_db):  # fmt: skip
    state = _sweep(tmp_path, mlflow_schema_db)
    one = _point(state, 0, base_cfg, 1, 1, 0.050)
    _point(state, 1, base_cfg, 2, 2, 0.040)  # model parallel: halo over the links
    _point(state, 2, base_cfg, 2, 1, 0.030, memory=M.PEAK_ALLOCATED_GIB)  # data parallel
    out = tmp_path / "report"
    rows = report_sweep(state, out_dir=out, print_table=False)

    # the model built here from the one-rank run, the point's graph and conf/cluster/local.yaml
    cal = load_calibration(f"mlflow:{one}@{state.tracking_uri}")
    graph = load_or_build(base_cfg.graph, Path(base_cfg.paths.cache) / "graphs")
    cluster = ClusterSpec.from_cfg(base_cfg.cluster)
    model = ScalingModel(graph, cal.mcfg, calibrate(cal, graph, cluster.hbm_Bps), cluster,
                         act_bytes=4, num_vars=cal.num_vars, input_steps=cal.input_steps)  # fmt: skip
    mp2, dp2 = model.project(2, 2, BATCH), model.project(2, 1, BATCH // 2)
    # calibrated on the one-rank point, the model reproduces it; the 2-rank layouts pay for
    # their communication over the configured links
    assert model.project(1, 1, BATCH).step_s == pytest.approx(0.050, rel=1e-9)
    assert mp2.halo_s > 0 and dp2.grad_s > 0 and mp2.layout == "dp1xmp2"

    assert math.isnan(rows[0].predicted_s)  # the calibration predicts nothing of itself
    assert rows[1].predicted_s == pytest.approx(mp2.step_s, rel=1e-12)
    assert rows[1].predicted_gib == pytest.approx(mp2.peak_gib, rel=1e-12)
    assert rows[1].err_s == pytest.approx(mp2.step_s / 0.040 - 1, rel=1e-12)
    assert math.isnan(rows[1].err_gib)  # resident memory against allocated tensors: no error
    assert rows[2].predicted_s == pytest.approx(dp2.step_s, rel=1e-12)
    assert rows[2].err_s == pytest.approx(dp2.step_s / 0.030 - 1, rel=1e-12)
    assert rows[2].err_gib == pytest.approx(dp2.peak_gib / 0.4 - 1, rel=1e-12)

    md = (out / "scaling.md").read_text()
    assert "| predicted s/step | s/step error | predicted peak GiB | peak error |" in md
    assert f"| {mp2.step_s:.4g} | {mp2.step_s / 0.040 - 1:+.1%} |" in md
    assert f"calibrated on point #0 (1 rank, MLflow run {one})" in md and "cluster local" in md
    assert "Peak error not computed: these points measured resident memory" in md
    with open(out / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["predicted_s"] == ""
    assert float(table[1]["predicted_s"]) == pytest.approx(mp2.step_s, rel=1e-12)
    assert float(table[2]["err_gib"]) == pytest.approx(dp2.peak_gib / 0.4 - 1, rel=1e-12)
    assert (out / "throughput_efficiency.png").stat().st_size > 20_000


def test_no_one_rank_point_no_prediction_and_why(base_cfg, tmp_path, mlflow_schema_db):
    state = _sweep(tmp_path, mlflow_schema_db)
    _point(state, 0, base_cfg, 2, 2, 0.040)
    _point(state, 1, base_cfg, 2, 1, 0.030)
    rows = report_sweep(state, out_dir=tmp_path / "out", print_table=False)
    assert all(math.isnan(r.predicted_s) for r in rows)
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert ("No prediction: no successful one-rank point to calibrate the scaling model on."
            in md)  # fmt: skip
    assert "predicted" not in md.split("\n\n")[1]  # no prediction columns in the table


def _no_links(cfg):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        del cfg.cluster["links"]
    return cfg


def _bad_graph(cfg):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.graph.nodes.data.grid = "Q12"
    return cfg


@pytest.mark.parametrize("case, config, edit, reason", [
    ("no config.yaml", "none", None, "cannot read the config.yaml of run"),
    pytest.param("config.yaml not YAML", "graph: [unclosed\n", None, "No prediction: ",
                 marks=pytest.mark.slow),
    ("cluster without links", "log", _no_links, "cluster.links.nvlink_GBps is not set"),
    pytest.param("graph cannot be built", "log", _bad_graph, "cannot load graph o8_l2",
                 marks=pytest.mark.slow),
])  # fmt: skip
def test_report_stands_when_the_calibration_cannot_be_read(base_cfg, tmp_path, mlflow_schema_db,
                                                           case, config, edit, reason):  # fmt: skip
    state = _sweep(tmp_path, mlflow_schema_db)
    cfg = edit(base_cfg) if edit else base_cfg
    _point(state, 0, cfg, 1, 1, 0.050, config=config)
    _point(state, 1, cfg, 2, 2, 0.040, config=config)
    out = tmp_path / "out"
    rows = report_sweep(state, out_dir=out, print_table=False)
    assert [r.step_s for r in rows] == [0.050, 0.040]
    assert all(math.isnan(r.predicted_s) for r in rows)
    md = (out / "scaling.md").read_text()
    notes = [ln for ln in md.splitlines() if ln.startswith("No prediction: ")]
    assert len(notes) == 1 and reason in notes[0], md
    assert "Traceback" not in md and "\n" not in notes[0]
    assert sorted(p.name for p in out.glob("*.png")) == ["memory.png", "throughput_efficiency.png"]
    assert state.client().get_run(state.parent_run_id).info.status == "FINISHED"
