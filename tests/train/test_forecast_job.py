"""jobs.forecast: says which checkpoint it scores, refuses one of another graph or model, and keeps
its scores (CSV beside the checkpoint, an MLflow run with one point per lead time)."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from squall.errors import SquallError
from squall.tracking import NullLogger, local_store_uri
from squall.tracking import metrics as M
from squall.train.forecast import CheckpointMismatch, forecast
from squall.train.runner import train

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _tiny() -> list[str]:
    """The tiny problem of this directory's conftest (read by path: several conftest modules)."""
    spec = importlib.util.spec_from_file_location("_train_conftest", Path(__file__).with_name(
        "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY)


TINY = _tiny()
FORECAST = ("forecast.steps=3", "forecast.max_starts=2", "data.test.start=40",
            "data.test.end=59", "training.run_dir=${paths.cache}/run")  # fmt: skip


def compose_tiny(cache: Path, *extra: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.cache={cache}", *FORECAST, *extra])


class TrainingRun(NullLogger):
    """Stands for the training job's MLflow run: the checkpoint records its id and store."""

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id, self.tracking_uri = run_id, tracking_uri


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_schema_db) -> tuple[Path, str]:
    """A cache holding a 4-step checkpoint of the tiny model, trained in MLflow run ``run_id`` of
    the cache's embedded store; returns (cache, run_id)."""
    cache = tmp_path_factory.mktemp("forecast")
    store = cache / "mlflow" / "mlruns"
    store.mkdir(parents=True)
    shutil.copy(mlflow_schema_db, store / "mlflow.db")
    uri = local_store_uri(cache / "mlflow")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("squall")).info.run_id
    train(compose_tiny(cache, "training.max_steps=4"), TrainingRun(run_id, uri))
    return cache, run_id


def test_forecast_names_its_checkpoint_and_keeps_its_scores(trained, capsys):
    cache, train_run = trained
    result = forecast(compose_tiny(cache))
    ckpt = cache / "run" / "checkpoint.pt"
    assert capsys.readouterr().out.startswith(
        f"checkpoint: {ckpt} (step 4, MLflow run {train_run})")
    assert result["checkpoint_step"] == 4 and result["trained_in_run"] == train_run

    assert result["csv"] == str(cache / "run" / "forecast" / "scores-step4-test.csv")
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    variables = list(result["rmse_by_variable"])
    assert len(variables) > 1
    assert list(rows[0]) == ["lead_hours", "rmse_model", "rmse_persistence", "skill",
                             *(f"rmse_{v}" for v in variables)]  # fmt: skip
    assert [float(r["lead_hours"]) for r in rows] == [6.0, 12.0, 18.0]
    assert [float(r["rmse_model"]) for r in rows] == result["rmse_model"]

    # the checkpoint says what it was trained on
    identity = torch.load(ckpt, weights_only=False)["identity"]
    assert identity["graph"]["name"] == "o8_l2" and identity["model"]["num_channels"] == 16

    client = MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == train_run
    assert run.data.tags["squall.checkpoint"] == str(ckpt)
    assert run.info.run_name.startswith("forecast-o8_l2-tiny-mp1dp1-")
    history = client.get_metric_history(run.info.run_id, M.FORECAST_RMSE_NORM)
    assert [(m.step, m.value) for m in history] == [
        (6, result["rmse_model"][0]), (12, result["rmse_model"][1]), (18, result["rmse_model"][2])]
    skill = client.get_metric_history(run.info.run_id, M.FORECAST_SKILL)
    assert [m.value for m in skill] == result["skill"]
    name = variables[0]
    physical = client.get_metric_history(run.info.run_id, M.forecast_rmse(name))
    assert [m.value for m in physical] == result["rmse_by_variable"][name]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "forecast")] == [
        "forecast/scores-step4-test.csv"]


def test_per_variable_rmse_is_the_normalised_one_in_each_variables_units(trained):
    """mean over variables of (rmse_v / scale_v)^2 == rmse_model^2: the two tables agree."""
    from squall.data.setup import build_dataset

    cache, _ = trained
    cfg = compose_tiny(cache, "tracking.enabled=false")
    result = forecast(cfg)
    scale = build_dataset(cfg, "train").normaliser.subset(list(result["rmse_by_variable"])).scale
    for s, total in enumerate(result["rmse_model"]):
        ms = [(values[s] / float(scale[i])) ** 2
              for i, values in enumerate(result["rmse_by_variable"].values())]  # fmt: skip
        # float64 sums of fp32 per-variable means: agree to fp32 rounding of each term
        assert math.sqrt(sum(ms) / len(ms)) == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize(("override", "said"), [
    ("graph.edges.encoder.factor=0.7", r"was trained on graph o8_l2 \(spec [0-9a-f]{16}\), this "
     r"forecast is on graph o8_l2 \(spec [0-9a-f]{16}\)"),
    ("model.num_channels=8", r"was trained with another model \(num_channels 16 != 8;"),
    ("model.processor_layers=3", r"another model \(processor_layers 2 != 3;"),
])  # fmt: skip
def test_a_checkpoint_of_another_graph_or_model_is_refused(trained, override, said):
    cache, _ = trained
    with pytest.raises(CheckpointMismatch, match=said):
        forecast(compose_tiny(cache, override))
    # refused before anything was built or written
    assert not (cache / "run" / "forecast" / "scores-step4-validation.csv").exists()


def test_how_the_model_runs_is_not_another_model(trained):
    """Recomputation (like the attention backend or compile) changes how, not what: accepted."""
    cache, _ = trained
    result = forecast(compose_tiny(cache, "model.checkpoint.processor=full",
                                   "tracking.enabled=false"))  # fmt: skip
    assert len(result["rmse_model"]) == 3 and "mlflow_run_id" not in result


def test_an_unreadable_checkpoint_gets_forecast_advice(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SquallError) as err:
        forecast(compose_tiny(tmp_path, f"forecast.checkpoint={bad}"))
    assert str(err.value).startswith(f"checkpoint {bad} cannot be read (")
    assert "delete it" not in str(err.value) and "forecast.checkpoint" in str(err.value)


@pytest.mark.slow
def test_forecast_job_refuses_a_foreign_checkpoint_in_one_line(trained):
    cache, _ = trained
    env = {**os.environ, "SQUALL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [a for a in TINY if not a.startswith("paths.cache")]
    done = subprocess.run([sys.executable, "-m", "jobs.forecast", *args, *FORECAST,
                           "model.num_heads=4", f"hydra.run.dir={cache}/hydra"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint {cache}/run/checkpoint.pt was trained with another model (num_heads "
        "2 != 4;")
