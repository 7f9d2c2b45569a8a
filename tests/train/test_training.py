import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squall.errors import DataError
from squall.train.loop import VariableLayout, area_weighted_mse, lr_lambda
from squall.train.runner import train

ROOT = Path(__file__).resolve().parents[2]


def test_variable_layout_and_residual_pairs():
    layout = VariableLayout.from_roles(
        {"prognostic": [0, 2, 5], "forcing": [1, 4], "diagnostic": [3]}
    )
    assert layout.inputs == [0, 1, 2, 4, 5] and layout.outputs == [0, 2, 3, 5]
    assert layout.residual == [(0, 0), (1, 2), (3, 4)]


def test_area_weighted_mse_weights_cells():
    pred, target = torch.zeros(1, 2, 1), torch.tensor([[[1.0], [3.0]]])
    assert float(area_weighted_mse(pred, target, torch.tensor([1.5, 0.5]))) == pytest.approx(
        (1.5 + 4.5) / 2
    )


def test_schedule_warms_up_then_decays():
    f = lr_lambda(10, 100, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.505) and f(100) == pytest.approx(0.01)


def test_kill_and_resume_gives_identical_losses(tiny_cfg, recording_logger):
    overrides = (
        "training.max_steps=12",
        "training.deterministic=true",
        "training.checkpoint_every=100",
    )
    whole = train(tiny_cfg(*overrides, "training.run_dir=${paths.cache}/whole"), recording_logger())
    killed_log = recording_logger(signal_at=6)
    cut = tiny_cfg(*overrides, "training.run_dir=${paths.cache}/cut")
    first = train(cut, killed_log)
    assert first["stopped_early"] and first["step"] == 6
    resumed = train(cut, recording_logger())
    assert resumed["step"] == 12
    assert first["losses"] + resumed["losses"] == whole["losses"], "bitwise identical after resume"


def test_fresh_run_ignores_checkpoint_when_resume_false(tiny_cfg, recording_logger):
    cfg = tiny_cfg("training.max_steps=3", "training.run_dir=${paths.cache}/r")
    train(cfg, recording_logger())
    again = train(
        tiny_cfg(
            "training.max_steps=3", "training.run_dir=${paths.cache}/r", "training.resume=false"
        ),
        recording_logger(),
    )
    assert again["step"] == 3 and len(again["losses"]) == 3


def test_missing_variable_and_short_split_are_clear(tiny_cfg, recording_logger):
    with pytest.raises(DataError, match="no_such_var"):
        train(
            tiny_cfg("training.max_steps=1", "data.variables=[z_500,no_such_var]"),
            recording_logger(),
        )
    with pytest.raises(DataError, match="needs"):
        train(tiny_cfg("training.max_steps=1", "data.validation.start=58"), recording_logger())


def run_train_job(tmp_path, tiny_overrides, *extra, env_extra=None):
    env = {**os.environ, "SQUALL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [a for a in tiny_overrides(tmp_path) if not a.startswith("paths.cache")]
    cmd = [sys.executable, "-m", "jobs.train", *args, *extra, f"hydra.run.dir={tmp_path}/hydra"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 13 s: a whole jobs.train process
def test_train_job_records_run_in_local_mlflow(tmp_path, tiny_overrides):
    out = run_train_job(tmp_path, tiny_overrides, "training.max_steps=6",
                        "training.timing_warmup_steps=2")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])["summary"]
    assert summary["step"] == 6
    from mlflow.tracking import MlflowClient

    from squall.tracking import local_store_uri

    client = MlflowClient(local_store_uri(tmp_path / "mlflow"))
    exp = client.get_experiment_by_name("squall")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["model.num_channels"] == "16" and run.data.params["graph.name"] == "o8_l2"
    )
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in ("loss/train", "time/last_step_s", "time/timed", "loss/val")}  # fmt: skip
    assert sorted(history["loss/train"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(history["loss/val"]) == [5, 6]  # training.val_every=5, and the last step
    # The run's timing is made of the steps it logged: 2 warm-up steps left out, batch 1.
    assert [history["time/timed"][s] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    timed = [history["time/last_step_s"][s] for s in range(3, 7)]
    metrics = run.data.metrics
    assert summary["time/measured_steps"] == metrics["time/measured_steps"] == 4
    assert metrics["throughput/samples_per_s"] == pytest.approx(4 / sum(timed), rel=1e-9)
    assert metrics["time/step_s"] == pytest.approx(statistics.median(timed), rel=1e-12)
    assert run.data.tags["env.torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    assert run.data.tags["env.git_sha"] == (os.environ.get("SQUALL_GIT_SHA") or head or "unknown")


def test_train_job_bad_input_is_one_line(tmp_path, tiny_overrides):
    out = run_train_job(
        tmp_path, tiny_overrides, "data.source=zarr", "data.path=/nonexistent/ds.zarr"
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error:")
        and "/nonexistent/ds.zarr" in last
        and "Traceback" not in out.stderr
    )
    # said before any tracking run was opened (a finished run in this run_dir stays FINISHED)
    assert not list(tmp_path.rglob("mlflow.db")), "a tracking store was opened for bad input"


def test_forecast_rolls_out_scores_and_writes_zarr(tiny_cfg, recording_logger, tmp_path):
    import numpy as np
    import zarr

    from squall.train.forecast import forecast

    extra = ("training.max_steps=4", "training.run_dir=${paths.cache}/fc", "forecast.steps=3",
             "forecast.max_starts=2", "data.test.start=40", "data.test.end=59",
             f"forecast.output={tmp_path}/fc.zarr")  # fmt: skip
    train(tiny_cfg(*extra), recording_logger())
    result = forecast(tiny_cfg(*extra))
    assert result["lead_hours"] == [6.0, 12.0, 18.0] and result["starts"] == 2
    assert all(np.isfinite(result["rmse_model"])) and all(r > 0 for r in result["rmse_persistence"])
    out = zarr.open_group(result["output"], mode="r")
    assert out["data"].shape == (2, 3, len(out.attrs["variables"]), 544)
    assert np.isfinite(out["data"][:]).all()
    # persistence error grows with lead time on smoothly evolving fields
    assert result["rmse_persistence"][2] > result["rmse_persistence"][0]


def test_forecast_without_checkpoint_is_clear(tiny_cfg):
    from squall.errors import SquallError
    from squall.train.forecast import forecast

    with pytest.raises(SquallError, match="checkpoint .* not found"):
        forecast(tiny_cfg("forecast.checkpoint=/nonexistent/ckpt.pt"))


def test_checkpoint_budget_chooses_the_policies(tiny_cfg, recording_logger, caplog):
    from squall.errors import ConfigError
    from squall.train.runner import build_run

    with caplog.at_level("INFO", logger="squall.train.runner"):
        parts = build_run(tiny_cfg("model.checkpoint.budget_gib=100"), recording_logger())
    cfg = parts.model.cfg
    assert (cfg.checkpoint_encoder, cfg.checkpoint_processor, cfg.checkpoint_decoder) == (
        "none", ("none", "none"), "none"
    ), "room for everything: nothing recomputed"
    assert any("checkpoint.budget_gib=100" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="budget_gib=0.1: parameters, gradients and AdamW"):
        build_run(tiny_cfg("model.checkpoint.budget_gib=0.1"), recording_logger())


@pytest.mark.parametrize(
    "job, bad, says",
    [
        ("jobs.dry_run", "model.checkpoint.processor=sometimes", "'sometimes' is not one of"),
        ("jobs.dry_run", "model.checkpoint.budget_gib=0.01", "raise the budget"),
        ("jobs.forecast", "forecast.steps=abc", "forecast.steps: Value 'abc' of type 'str'"),
    ],
)
def test_bad_values_are_one_line(tmp_path, tiny_overrides, job, bad, says):
    cmd = [sys.executable, "-m", job, *tiny_overrides(tmp_path), bad]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and says in last and "Traceback" not in out.stderr, last


def test_resuming_past_max_steps_says_so(tiny_cfg, recording_logger, caplog):
    cfg = tiny_cfg("training.max_steps=2")
    train(cfg, recording_logger())
    with caplog.at_level("WARNING", logger="squall.train.loop"):
        train(tiny_cfg("training.max_steps=1"), recording_logger())
    assert any("nothing to train" in r.getMessage() for r in caplog.records)


def test_nan_in_the_data_names_the_store_not_a_divergence(tiny_cfg, recording_logger):
    """Values damaged inside an intact chunk pass the chunk check; the first non-finite loss then
    points at the store and the times, and a non-finite loss on finite data says diverged."""
    import zarr

    from squall.data.setup import ensure_dataset
    from squall.train.loop import TrainingDiverged
    from squall.train.runner import build_run

    cfg = tiny_cfg("training.max_steps=3")
    path = ensure_dataset(cfg)
    zarr.open_group(str(path), mode="r+")["data"][0:40, 0, 0, 5] = float("nan")  # every train time
    with pytest.raises(DataError) as err:
        train(cfg, recording_logger())
    msg = str(err.value)
    assert str(path) in msg and "NaN or infinite" in msg and "step 1 " in msg and "\n" not in msg
    parts = build_run(tiny_cfg("training.max_steps=3", "data.path=" + str(path) + "-fresh"),
                      recording_logger())  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 0: .*training\.lr"):
        parts.trainer.global_loss(torch.tensor(float("nan")))
