"""The MLflow logger against a real server over HTTP, the embedded sqlite store, the fallback from
an unreachable server, and the null logger; everything read back through MlflowClient."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from squall.tracking import (
    MlflowLogger,
    NullLogger,
    create_logger,
    flatten_config,
    local_store_uri,
    start_sweep_parent,
)
from squall.tracking import logger as logger_module
from squall.tracking.logger import MAX_PARAM_VALUE_LENGTH, TRUNCATED

REPO = Path(__file__).resolve().parents[2]


def git_head() -> str:
    """The checkout's commit as git prints it (``SQUALL_GIT_SHA`` when set, as on clusters that
    receive the code without ``.git``), or what squall records outside a checkout."""
    if os.environ.get("SQUALL_GIT_SHA"):
        return os.environ["SQUALL_GIT_SHA"]
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else "unknown"


@pytest.fixture
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def store_dir(tmp_path, mlflow_schema_db) -> Path:
    """A run directory whose embedded store (``mlruns/mlflow.db``) already has its schema."""
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_schema_db, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path


def test_server_roundtrip(mlflow_server, tmp_path):
    artifact = tmp_path / "table.csv"
    artifact.write_text("gpus,samples_per_s\n1,10.5\n")
    cfg = {"model": {"channels": 64, "heads": [4, 8]}, "seed": 7}
    with MlflowLogger(uri=mlflow_server, experiment="roundtrip", store_dir=tmp_path,
                      run_name="point") as run:
        run.log_params(cfg)
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            run.log_metrics({"loss/train": loss, "time/step_s": 0.1 * (step + 1)}, step=step)
        run.log_artifact(artifact, artifact_path="report")
        run.set_tags({"layout": "dp2"})
    assert run.tracking_uri == mlflow_server and run.fallback_from is None

    client = MlflowClient(tracking_uri=mlflow_server)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "point"
    assert got.data.params == {"model.channels": "64", "model.heads": "[4, 8]", "seed": "7"}
    history = client.get_metric_history(run.run_id, "loss/train")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    tags = got.data.tags
    assert tags["layout"] == "dp2"
    assert tags["env.torch"] == torch.__version__
    # What git and the OS say, not what the logger's own helper says.
    assert tags["env.git_sha"] == git_head()
    assert tags["env.hostname"] == socket.gethostname()
    assert tags["env.gpu_count"] == str(torch.cuda.device_count())
    assert {"env.cuda", "env.nccl", "env.gpu_name"} <= set(tags)
    files = [f.path for f in client.list_artifacts(run.run_id, "report")]
    assert files == ["report/table.csv"]
    local = client.download_artifacts(run.run_id, "report/table.csv", str(tmp_path / "dl"))
    assert Path(local).read_text() == artifact.read_text()


def test_sweep_runs_nest_under_their_parent(mlflow_server, tmp_path):
    sweep = f"s{time.time_ns()}"
    parent = start_sweep_parent(sweep, uri=mlflow_server, experiment="sweeps", store_dir=tmp_path)
    children = [MlflowLogger(uri=mlflow_server, experiment="sweeps", store_dir=tmp_path,
                             run_name=f"gpus={n}", sweep_id=sweep, log_environment=False)
                for n in (1, 2)]
    for child in children:
        child.finish()
    parent.finish()
    client = MlflowClient(tracking_uri=mlflow_server)
    found = client.search_runs([parent.experiment_id], f"tags.sweep_id = '{sweep}'")
    assert {r.info.run_id for r in found} == {parent.run_id} | {c.run_id for c in children}
    for child in children:
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def test_embedded_sqlite_store_by_default(tmp_path, no_env_uri):
    with create_logger({"enabled": True, "experiment": "local"}, store_dir=tmp_path,
                       run_name="cpu") as run:
        run.log_config(OmegaConf.create({"a": {"b": 2}, "c": "${a.b}"}))
        run.log_metrics({"throughput/samples_per_s": 12.5}, step=10)
    db = tmp_path / "mlruns" / "mlflow.db"
    assert run.tracking_uri == local_store_uri(tmp_path) == f"sqlite:///{db}"
    assert db.is_file()
    client = MlflowClient(tracking_uri=run.tracking_uri)
    got = client.get_run(run.run_id)
    assert got.data.params == {"a.b": "2", "c": "2"}
    assert got.data.metrics == {"throughput/samples_per_s": 12.5}
    # Artifacts sit beside the database, where the experiment was told to keep them.
    stored = tmp_path / "mlruns" / "artifacts" / run.run_id / "artifacts" / "config.yaml"
    assert OmegaConf.load(stored) == OmegaConf.create({"a": {"b": 2}, "c": 2})


def test_environment_variable_points_elsewhere(tmp_path, monkeypatch, mlflow_schema_db):
    (tmp_path / "other").mkdir()
    shutil.copy(mlflow_schema_db, tmp_path / "other" / "runs.db")
    elsewhere = f"sqlite:///{tmp_path / 'other' / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    run = create_logger({}, store_dir=tmp_path / "default", log_environment=False)
    run.finish()
    assert run.tracking_uri == elsewhere
    assert MlflowClient(tracking_uri=elsewhere).get_run(run.run_id).info.status == "FINISHED"
    assert not (tmp_path / "default" / "mlruns").exists()  # no embedded store was created


def test_unreachable_server_falls_back_to_local_store(store_dir, caplog, no_env_uri, unused_port):
    tmp_path = store_dir
    dead = f"http://127.0.0.1:{unused_port}"
    logger_module._warned.discard(dead)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="squall.tracking.logger"):
        first = create_logger({"uri": dead}, store_dir=tmp_path, log_environment=False)
        second = create_logger({"uri": dead}, store_dir=tmp_path, log_environment=False)
    elapsed = time.monotonic() - start
    first.log_metrics({"loss/train": 1.0}, step=1)
    first.finish()
    second.finish()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per server, not once per run
    assert dead in warnings[0] and local_store_uri(tmp_path) in warnings[0]
    assert "\n" not in warnings[0]
    assert first.tracking_uri == local_store_uri(tmp_path) and first.fallback_from == dead
    # The probe is short; store creation dominates (sqlite schema set-up, several seconds).
    assert elapsed < 60
    got = MlflowClient(tracking_uri=first.tracking_uri).get_run(first.run_id)
    assert got.data.metrics == {"loss/train": 1.0}
    assert got.data.tags["squall.tracking_fallback_from"] == dead


def test_failed_run_is_marked_failed(store_dir, no_env_uri):
    with pytest.raises(RuntimeError, match="boom"):
        with create_logger({}, store_dir=store_dir, log_environment=False) as run:
            raise RuntimeError("boom")
    status = MlflowClient(tracking_uri=run.tracking_uri).get_run(run.run_id).info.status
    assert status == "FAILED"


def test_null_logger_for_other_ranks_and_disabled_tracking(tmp_path, no_env_uri):
    for logger in (create_logger({}, store_dir=tmp_path, rank=1),
                   create_logger({"enabled": False}, store_dir=tmp_path)):
        assert isinstance(logger, NullLogger) and logger.run_id is None
        with logger as run:
            run.log_params({"a": 1})
            run.log_metrics({"loss/train": 1.0}, step=0)
            run.log_artifact(tmp_path / "missing.txt")
            run.set_tags({"t": 1})
    assert list(tmp_path.iterdir()) == []  # no store was created


def test_flatten_config():
    cfg = OmegaConf.create({
        "model": {"width": 8, "blocks": [{"heads": 2}, {"heads": 4}], "opts": {}},
        "sizes": [1, 2.5, None],
        "ref": "${model.width}",
        "todo": "???",
        "long": "x" * (MAX_PARAM_VALUE_LENGTH + 10),
    })
    flat = flatten_config(cfg)
    assert flat["model.width"] == "8"
    assert flat["model.blocks.0.heads"] == "2" and flat["model.blocks.1.heads"] == "4"
    assert flat["model.opts"] == "{}"
    assert flat["sizes"] == "[1, 2.5, null]"
    assert flat["ref"] == "8"
    assert flat["todo"] == "???"
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH and flat["long"].endswith(TRUNCATED)


RACE_SCRIPT = """
import sys
from squall.tracking import create_logger
run = create_logger({"experiment": "race"}, store_dir=sys.argv[1], log_environment=False)
run.finish()
print(run.experiment_id, run.run_id)
"""


def test_parallel_jobs_share_a_fresh_embedded_store(tmp_path, no_env_uri):
    # Three sweep points starting at once into a store that does not exist yet: unguarded, one
    # fails ("duplicate column name") or lands in another experiment (RECIPE.md).
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outs]
    ids = [out.split() for out, _ in outs]
    assert len({experiment for experiment, _ in ids}) == 1
    client = MlflowClient(tracking_uri=local_store_uri(tmp_path))
    runs = client.search_runs([ids[0][0]])
    assert {r.info.run_id for r in runs} == {run for _, run in ids}
