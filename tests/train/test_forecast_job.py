"""jobs.forecast: says which checkpoint it scores, refuses one of another graph or model, keeps its
scores (CSV beside the checkpoint, an MLflow run with one point per lead time) and its speed; the
fields it writes in the background are the rollout's, whatever the layout (chunked, sharded over
ranks, data-parallel starts); a slow or failing disk neither stalls nor loses anything silently."""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from squall.data.normalise import Normaliser
from squall.data.zarr_dataset import check_chunks
from squall.errors import DataError, SquallError
from squall.tracking import NullLogger, local_store_uri
from squall.tracking import metrics as M
from squall.train import forecast_store
from squall.train.forecast import CheckpointMismatch, forecast
from squall.train.forecast_store import (
    FieldWriter,
    ForecastWriteError,
    create_store,
    finish_store,
)
from squall.train.runner import build_run, train
from squall.train.signals import Stopped

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def _tiny() -> list[str]:
    """The tiny problem of this directory's conftest (read by path: several conftest modules)."""
    spec = importlib.util.spec_from_file_location(
        "_train_conftest", Path(__file__).with_name("conftest.py")
    )
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
        f"checkpoint: {ckpt} (step 4, MLflow run {train_run})"
    )
    assert result["checkpoint_step"] == 4 and result["trained_in_run"] == train_run

    assert result["csv"] == str(cache / "run" / "forecast" / "scores-step4-test.csv")
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    variables = list(result["rmse_by_variable"])
    assert len(variables) > 1
    assert list(rows[0]) == ["lead_hours", "rmse_model", "rmse_persistence", "skill",
                             *(f"rmse_{v}" for v in variables), "crps_model",
                             "crps_persistence"]  # fmt: skip
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
        (6, result["rmse_model"][0]),
        (12, result["rmse_model"][1]),
        (18, result["rmse_model"][2]),
    ]
    skill = client.get_metric_history(run.info.run_id, M.FORECAST_SKILL)
    assert [m.value for m in skill] == result["skill"]
    name = variables[0]
    physical = client.get_metric_history(run.info.run_id, M.forecast_rmse(name))
    assert [m.value for m in physical] == result["rmse_by_variable"][name]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "forecast")] == [
        "forecast/scores-step4-test.csv"
    ]
    # how fast, and what it held
    speed = run.data.metrics
    assert speed[M.FORECAST_STEP_S] == result["step_s_median"] > 0
    assert speed[M.FORECAST_ROLLOUT_S] == pytest.approx(3 * result["step_s_median"])
    # 2 starts x 3 steps, at least half of them as long as the median step, within the total
    assert speed[M.FORECAST_TOTAL_S] >= 3 * speed[M.FORECAST_STEP_S]
    assert speed[M.FORECAST_WRITE_WAIT_S] == 0.0  # nothing written
    assert speed[M.PEAK_RSS_GIB] > 0  # CPU: the process's peak resident memory


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
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: checkpoint {cache}/run/checkpoint.pt was trained with another model (num_heads "
            "2 != 4;"
        )
    )


# ----------------------------------------------------------------------------------------------
# Fields written in the background, and the layouts that must not change them


def reference_fields(cfg) -> np.ndarray:
    """``[start, step, variable, grid]`` denormalised predictions of the training code's own
    rollout (``Trainer.rollout``, fp32, one process) from the starts the forecast picks."""
    from squall.data.setup import build_dataset

    parts = build_run(cfg, NullLogger(), training=False)
    parts.model.load_state_dict(torch.load(cfg.forecast.checkpoint, weights_only=False)["model"])
    parts.model.eval()
    steps = int(cfg.forecast.steps)
    data = build_dataset(cfg, "test", rollout=steps, normaliser=parts.train_set.normaliser)
    starts = np.unique(np.linspace(0, len(data) - 1, min(int(cfg.forecast.max_starts),
                                                          len(data))).astype(int))  # fmt: skip
    out_vars = [data.variables[i] for i in parts.layout.outputs]
    norm = parts.train_set.normaliser.subset(out_vars)
    fields = []
    with torch.no_grad():
        for k in starts:
            sample = data[int(k)]
            batch = {"x": sample["x"][None], "y": sample["y"][None]}
            preds = [norm.denormalise(p[0]) for p, _ in parts.trainer.rollout(batch)]
            fields.append(torch.stack(preds).transpose(1, 2).numpy())
    return np.stack(fields)


@pytest.fixture(scope="module")
def plain(trained, tmp_path_factory) -> tuple[dict, np.ndarray]:
    """The plain one-process fp32 forecast with its fields written, and the stored fields."""
    cache, _ = trained
    out = tmp_path_factory.mktemp("plain") / "fc.zarr"
    result = forecast(compose_tiny(cache, f"forecast.output={out}", "tracking.enabled=false"))
    return result, zarr.open_group(str(out), mode="r")["data"][:]


def test_written_fields_are_the_rollout_and_the_store_says_complete(trained, plain):
    cache, _ = trained
    result, fields = plain
    store = zarr.open_group(result["output"], mode="r")
    assert store.attrs["complete"] is True and store.attrs["fields_written"] == 2 * 3
    assert store.attrs["lead_hours"] == [6.0, 12.0, 18.0]
    # the test split is times 40..59 (6-hourly from 2020-01-01); the starts are its first and last
    # 3-step windows (0 and 15), whose last input states are times 41 and 56
    assert store.attrs["initial_dates"] == ["2020-01-11T06:00:00", "2020-01-15T00:00:00"]
    expected = reference_fields(compose_tiny(cache))
    assert fields.shape == expected.shape == (2, 3, len(store.attrs["variables"]), 544)
    # the same fp32 operations as the training code's rollout, in inference mode: bitwise
    assert np.array_equal(fields, expected)


def test_chunked_mappers_and_the_cuda_graph_option_change_nothing_on_cpu(trained, plain, tmp_path,
                                                                        caplog):  # fmt: skip
    cache, _ = trained
    result, fields = plain
    out = tmp_path / "fc.zarr"
    with caplog.at_level(logging.INFO, logger="squall.train.forecast"):
        chunked = forecast(compose_tiny(cache, f"forecast.output={out}", "parallel.chunks=3",
                                        "forecast.cuda_graphs=true", "tracking.enabled=false"))  # fmt: skip
    assert "forecast.cuda_graphs: no CUDA device, the step runs eagerly on cpu" in caplog.text
    assert chunked["cuda_graph"] is False
    # chunking splits the mappers' destinations, each one's edges and sums unchanged: bitwise
    assert np.array_equal(zarr.open_group(str(out), mode="r")["data"][:], fields)
    assert chunked["rmse_model"] == result["rmse_model"]


def test_progress_shows_lead_time_speed_and_eta(trained, monkeypatch, capsys):
    cache, _ = trained
    monkeypatch.setenv("SQUALL_PROGRESS", "1")  # the bar, as on a terminal
    forecast(compose_tiny(cache, "tracking.enabled=false"))
    err = capsys.readouterr().err
    assert "forecast (2 starts x 3 steps of 6 h)" in err
    assert "start 2/2, lead 18 h" in err and " s/step, ETA 0 s" in err


# Seconds each write takes in the slow-disk test: long against a queue operation (microseconds)
# even on the loaded 2-core machine, short enough for the default test run.
SLOW_WRITE_S = 0.3
NORM = Normaliser(["a", "b", "c"], [1.0, -2.0, 300.0], [0.5, 3.0, 40.0])


class SlowDisk(FieldWriter):
    """Each field takes SLOW_WRITE_S to reach the disk (the writer thread sleeps first)."""

    def _write(self, where, field):
        time.sleep(SLOW_WRITE_S)
        super()._write(where, field)


def _store(path, starts=1, steps=5, grid=6, compression="none"):
    create_store(path, (starts, steps, 3, grid), {"variables": ["a", "b", "c"]}, compression)
    return path


def test_a_slow_disk_does_not_stall_the_rollout_and_nothing_is_lost(tmp_path):
    writer = SlowDisk(_store(tmp_path / "fc.zarr"), torch.device("cpu"), NORM, queue_size=2)
    fields = [torch.randn(6, 3) for _ in range(5)]
    began = time.perf_counter()
    for s in range(3):  # queue_size + 1 buffers: handed over without waiting for the disk
        writer.put(0, s, fields[s])
    assert time.perf_counter() - began < SLOW_WRITE_S and writer.wait_s < SLOW_WRITE_S / 2
    for s in range(3, 5):  # every buffer waits for the disk: bounded, the rollout blocks
        writer.put(0, s, fields[s])
    assert writer.wait_s >= SLOW_WRITE_S / 2
    writer.close()
    finish_store(writer.path, writer.written, 5, None)
    store = zarr.open_group(str(writer.path), mode="r")
    assert store.attrs["complete"] is True and store.attrs["fields_written"] == 5
    # in each variable's units, [variable, grid]: the normaliser's own denormalise, bitwise
    expected = np.stack([NORM.denormalise(f).numpy().T for f in fields])
    assert np.array_equal(store["data"][0], expected)


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_a_field_is_one_whole_chunk_the_dataset_check_reads(tmp_path, compression):
    path = _store(tmp_path / "fc.zarr", steps=3, compression=compression)
    writer = FieldWriter(path, torch.device("cpu"), NORM, queue_size=1)
    fields = [torch.randn(6, 3) for _ in range(3)]
    for s in (0, 2):
        writer.put(0, s, fields[s])
    writer.close()
    store = zarr.open_group(str(path), mode="r")
    assert store.attrs["compression"] == compression
    assert sorted(p.name for p in (path / "data").iterdir()) == [".zarray", ".zattrs", "0.0.0.0",
                                                                 "0.2.0.0"]  # fmt: skip
    data = store["data"][:]
    assert np.array_equal(data[0, 2], NORM.denormalise(fields[2]).numpy().T)
    assert np.isnan(data[0, 1]).all()  # never written: zarr's fill value
    # squall's dataset check finds the missing field and passes the stored ones
    with pytest.raises(DataError, match=r"1 of 3 chunks missing \(time 0 chunk 0\.1\.0\.0\)"):
        check_chunks(path, decode=compression == "none")
    writer = FieldWriter(path, torch.device("cpu"), NORM, queue_size=1)
    writer.put(0, 1, fields[1])
    writer.close()
    assert check_chunks(path) == 3


def test_a_field_over_the_chunk_limit_is_split_by_whole_variables(tmp_path, monkeypatch):
    # O1280's 100 fields (2.6 GB a step) in chunks of 20 variables (512 MiB at most)
    assert forecast_store.variables_per_chunk(100, 6_599_680) == 20
    monkeypatch.setattr(forecast_store, "MAX_CHUNK_BYTES", 2 * 6 * 4)  # two variables of 6 points
    path = _store(tmp_path / "fc.zarr", steps=1, compression="lz4")
    writer = FieldWriter(path, torch.device("cpu"), NORM, queue_size=1)
    field = torch.randn(6, 3)
    writer.put(0, 0, field)
    writer.close()
    assert sorted(p.name for p in (path / "data").iterdir() if not p.name.startswith(".")) == [
        "0.0.0.0", "0.0.1.0"]  # fmt: skip
    assert np.array_equal(zarr.open_group(str(path), mode="r")["data"][0, 0],
                          NORM.denormalise(field).numpy().T)  # fmt: skip


def test_a_failing_disk_is_one_error_and_an_incomplete_store(tmp_path):
    path = _store(tmp_path / "fc.zarr")
    writer = FieldWriter(path, torch.device("cpu"), queue_size=1)
    writer.put(0, 0, torch.ones(6, 3))
    writer.close()  # the first field is on disk
    writer = FieldWriter(path, torch.device("cpu"), queue_size=1)
    # the disk refuses every further chunk: its folder becomes a file
    shutil.rmtree(path / "data")
    (path / "data").write_text("not a folder")
    with pytest.raises(ForecastWriteError) as err:
        for s in range(1, 5):
            writer.put(0, s, torch.ones(6, 3))
            time.sleep(0.05)  # let the thread fail before the last put
        writer.close()
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"writing forecast fields to {path} failed at start 0, step 2 ("
    )
    assert "the store is marked incomplete" in message
    writer.abort()  # raised once; the thread has stopped
    finish_store(path, 1 + writer.written, 5, f"ForecastWriteError: {message}")
    attrs = zarr.open_group(str(path), mode="r").attrs
    assert attrs["complete"] is False and attrs["fields_written"] == 1
    assert attrs["error"].startswith("ForecastWriteError: writing forecast fields")


@pytest.mark.slow  # fault injection: a stop signal in the middle of a rollout
def test_a_stop_signal_mid_rollout_loses_no_field_it_computed(trained, plain, tmp_path):
    """SIGTERM (scancel, preemption) while fields are being written: every field the rollout
    handed over is on disk, whole and right; the store says how many and that it is incomplete."""
    cache, _ = trained
    out = tmp_path / "fc.zarr"
    # 8 starts x 3 steps, the first and last of them plain's: the rollout runs for 20 more steps
    # after the first field lands
    cfg = compose_tiny(cache, f"forecast.output={out}", "forecast.max_starts=8",
                       "tracking.enabled=false")  # fmt: skip
    total, done = 8 * 3, threading.Event()

    def stop_when_a_field_lands():
        while not done.is_set():
            if (out / "data").is_dir() and any(p.name[0] != "." for p in (out / "data").iterdir()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=stop_when_a_field_lands, daemon=True)
    watcher.start()
    try:
        with pytest.raises(Stopped):
            forecast(cfg)
    finally:
        done.set()
        watcher.join()
    store = zarr.open_group(str(out), mode="r")
    written = store.attrs["fields_written"]
    assert store.attrs["complete"] is False and store.attrs["error"] == "Stopped: SIGTERM"
    assert 1 <= written < total, "the signal came after the rollout had finished"
    stored = store["data"][:].reshape(total, *store["data"].shape[2:])
    on_disk = [n for n in range(total) if not np.isnan(stored[n]).all()]
    # the fields handed to the writer are the first ones, all of them on disk, whole: the first
    # start's are plain's own, bitwise
    assert on_disk == list(range(written))
    first = min(written, 3)
    assert np.array_equal(stored[:first], plain[1][0, :first])
    assert np.isfinite(stored[:written]).all()
    assert not [p for p in (out / "data").iterdir() if p.name.endswith(".partial")]


def _launch(cache: Path, overrides: list[str], world: int) -> list[subprocess.CompletedProcess]:
    """jobs.forecast on ``world`` CPU ranks, launched as srun would (gloo)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    base.update(SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1")
    job = str(uuid.uuid4().int % 10**8)
    args = [a for a in TINY if not a.startswith("paths.cache")]
    procs = []
    for rank in range(world):
        env = {**base, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(world),
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
               "SLURM_STEP_TASKS_PER_NODE": str(world)}  # fmt: skip
        cmd = [sys.executable, "-m", "jobs.forecast", *args, *FORECAST, *overrides,
               f"hydra.run.dir={cache}/hydra{rank}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


@pytest.mark.slow  # about 40 s: two job processes per layout
@pytest.mark.parametrize("layout", [["parallel.model_parallel=2"], ["parallel.model_parallel=1"]],
                         ids=["graph_split_over_2_ranks", "starts_split_over_2_replicas"])  # fmt: skip
def test_two_ranks_write_and_score_what_one_process_does(trained, plain, layout, tmp_path):
    """fp32 on gloo: each rank's rows see the same edges, summed in the same order, as in one
    process (tests/parallel/test_sharded_model.py), and scores are summed over the same starts in
    the same order: bitwise equal."""
    cache, _ = trained
    result, fields = plain
    out = tmp_path / "fc.zarr"
    done = _launch(cache, [*layout, f"forecast.output={out}", "tracking.enabled=false"], world=2)
    assert "rmse model" in done[0].stdout and "rmse model" not in done[1].stdout, "rank 0 reports"
    assert "starts on 2 rank(s)" in done[0].stdout
    store = zarr.open_group(str(out), mode="r")
    assert store.attrs["complete"] is True and store.attrs["fields_written"] == 2 * 3
    assert np.array_equal(store["data"][:], fields)
    import json

    two = json.loads(done[0].stdout.strip().splitlines()[-1])
    assert two["rmse_model"] == result["rmse_model"] and two["skill"] == result["skill"]
    assert two["ranks"] == 2 and len(two["memory_by_rank"]) == 2
