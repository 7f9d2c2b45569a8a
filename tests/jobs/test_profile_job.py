"""jobs.profile on CPU: a trace Perfetto can read, kernel and component tables whose times add up,
the files as MLflow artifacts, the memory snapshot's absence said in the log, bad settings in one
line, and one folder per rank when several ranks share the graph."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from torch.profiler import ProfilerActivity, profile, record_function

from jobs import _entry
from squall import schema
from squall.errors import ConfigError
from squall.profiler import (
    COMPONENTS,
    STEP_RANGE,
    component_times,
    instrument,
    profile_job,
)
from squall.tracking import local_store_uri
from squall.tracking import metrics as M

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
# O8 grid and a level-2 mesh (tests/train/conftest.py's problem): a step in tens of ms on CPU.
TINY = ["graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
        "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
        "data.train.start=0", "data.train.end=39", "data.validation.start=40",
        "data.validation.end=59", "model.num_channels=16", "model.num_heads=2",
        "profile.warmup_steps=0", "profile.steps=1"]  # fmt: skip


def compose_profile(cache: Path, *extra: str):
    schema.register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("profile", overrides=[*TINY, f"paths.cache={cache}",
                                             f"profile.output={cache}/profile", *extra])  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cache(tmp_path_factory, mlflow_schema_db) -> Path:
    """A cache with an embedded MLflow store (graph and dataset built by the first test)."""
    root = tmp_path_factory.mktemp("profile")
    store = root / "mlflow" / "mlruns"
    store.mkdir(parents=True)
    shutil.copy(mlflow_schema_db, store / "mlflow.db")
    return root


def check_folder(folder: Path, busy: tuple[str, ...]) -> dict[str, float]:
    """The files of one rank's profile open and add up; returns the component times."""
    assert sorted(p.name for p in folder.iterdir()) == ["components.csv", "kernels.csv",
                                                        "trace.json"]  # fmt: skip
    # the trace is Chrome's JSON format (what Perfetto opens), with squall's ranges in it
    events = json.loads((folder / "trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {STEP_RANGE, *(f"squall::{c}" for c in busy)} <= names

    # components: every one of the step's parts has time, and they add up to the steps' time
    rows = {r["component"]: float(r["s_per_step"]) for r in read_csv(folder / "components.csv")}
    assert list(rows) == list(COMPONENTS)
    assert all(rows[c] > 0 for c in busy)
    steps = [e for e in events if e.get("name") == STEP_RANGE]
    mean_step = sum(e["dur"] for e in steps) / len(steps) / 1e6
    # CPU: "other" is the steps' wall time left over, so the sum is the mean step (rounded to
    # the microsecond in the CSV and in the trace)
    assert sum(rows.values()) == pytest.approx(mean_step, abs=len(rows) * 1e-6 + 2e-6)

    # kernels (CPU: operators' own time), longest first; matrix products carry a FLOP rate
    kernels = read_csv(folder / "kernels.csv")
    assert list(kernels[0]) == ["name", "calls", "total_ms", "mean_us", "share_pct", "tflops",
                                "pct_of_matmul_peak", "input_GBps", "pct_of_copy_rate"]  # fmt: skip
    totals = [float(k["total_ms"]) for k in kernels]
    assert totals == sorted(totals, reverse=True) and totals[0] > 0
    mm = [k for k in kernels if k["name"] in ("aten::mm", "aten::addmm", "aten::bmm")]
    assert mm and all(float(k["tflops"]) > 0 and float(k["pct_of_matmul_peak"]) > 0 for k in mm)
    assert any(k["input_GBps"] for k in kernels if k["name"] == "aten::index_select")
    # shares are of the recorded steps' wall time: the operators' own times cannot exceed it
    assert 0 < sum(float(k["share_pct"]) for k in kernels) <= 100.5
    return rows


def test_a_forecast_step_profile_opens_and_adds_up(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="squall.profiler"):
        result = profile_job(compose_profile(tmp_path, "profile.mode=forecast",
                                             "tracking.enabled=false",
                                             "forecast.cuda_graphs=true"))  # fmt: skip
    assert "CUDA memory snapshot: not written (no CUDA device; profiling on cpu)" in caplog.text
    rows = check_folder(tmp_path / "profile" / "rank0", ("encoder", "processor", "decoder"))
    assert rows["optimiser"] == 0.0 and rows["communication"] == 0.0  # inference, one process
    assert result["mode"] == "forecast" and "mlflow_run_id" not in result


@pytest.mark.slow  # 10 to 20 s on 2 cores: a training step under the profiler, an MLflow store
def test_a_training_step_profile_goes_to_mlflow(cache):
    result = profile_job(compose_profile(cache))
    rows = check_folder(
        cache / "profile" / "rank0", ("encoder", "processor", "decoder", "optimiser")
    )
    assert rows["communication"] == 0.0  # one process
    client = MlflowClient(local_store_uri(cache / "mlflow"))
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name.startswith("profile-o8_l2-tiny-mp1dp1-")
    assert run.data.metrics[M.PROFILE_STEP_S] == result["step_s"]
    assert run.data.metrics[M.profile_component_s("processor")] == pytest.approx(
        rows["processor"], abs=1e-6
    )
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "profile/rank0")) == [
        "profile/rank0/components.csv",
        "profile/rank0/kernels.csv",
        "profile/rank0/trace.json",
    ]
    assert result["mode"] == "train" and result["world"] == 1


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward takes ``SLOW_S``: a backward the attribution must find."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLOW_S)
        return grad


# Long against the microseconds the rest of these steps takes, even on a loaded 2-core machine.
SLOW_S = 0.15


def test_backward_and_optimiser_time_go_to_their_component():
    """A block whose backward sleeps and an optimiser step that sleeps: the backward's time is
    the encoder's (through the sequence number of the forward op inside ``squall::encoder``),
    the optimiser's is the optimiser's, and nothing of either lands in ``other``."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def run_block(self, role, x):
            return _SlowBackward.apply(x * self.w)

        def forward(self, x):
            return self.run_block("encoder", x).sum()

    class SlowSGD(torch.optim.SGD):
        def step(self, closure=None):
            time.sleep(SLOW_S)
            return super().step(closure)

    model = Model()
    opt = SlowSGD(model.parameters(), lr=0.1)
    remove = instrument(model, opt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP_RANGE):
            model(torch.randn(4)).backward()
            opt.step()
    remove()
    times = component_times(prof.events(), cuda=False, steps=1)
    assert times["encoder"] >= SLOW_S and times["optimiser"] >= SLOW_S
    assert times["other"] < SLOW_S / 2
    assert "run_block" not in vars(model)  # instrumentation removed


@pytest.mark.parametrize(("override", "said"), [
    ("profile.steps=0", "profile.steps=0: must be >= 1"),
    ("profile.mode=sample", "profile.mode='sample': choose one of train, forecast"),
    ("profile.step=3", "profile.step is not a setting; profile settings:"),
])  # fmt: skip
def test_bad_profile_settings_are_one_line(tmp_path, override, said):
    schema.register()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("profile", overrides=[override, "profile.output=/tmp/x"])
        schema.validate(cfg)
        message = None
    except Exception as err:  # noqa: BLE001 - what the job would print
        assert isinstance(err, ConfigError) or _entry._is_config_error(err), repr(err)
        message = str(err) if isinstance(err, ConfigError) else _entry.describe_config_error(err)
    assert message is not None and message.startswith(said) and "\n" not in message


@pytest.mark.slow  # about 30 s: two job processes
def test_two_ranks_write_one_folder_each_and_see_their_halo_exchange(cache, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    base.update(SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1")
    job, world = str(uuid.uuid4().int % 10**8), 2
    procs = []
    for rank in range(world):
        env = {**base, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
               "SLURM_STEP_TASKS_PER_NODE": "2"}  # fmt: skip
        cmd = [sys.executable, "-m", "jobs.profile", *TINY, "parallel.model_parallel=2",
               f"profile.output={tmp_path}/profile", f"hydra.run.dir={tmp_path}/hydra{rank}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "component" in outs[0][0] and outs[1][0] == "", "rank 0 reports"
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    for rank in range(world):
        # gloo records each collective on its own threads and on the waiting one: counted once,
        # the components still add up to the step
        rows = check_folder(tmp_path / "profile" / f"rank{rank}", ("encoder", "processor",
                                                                   "decoder", "optimiser"))  # fmt: skip
        assert rows["communication"] > 0, f"rank {rank}: the halo exchange is communication"
    client = MlflowClient(local_store_uri(cache / "mlflow"))
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name.startswith("profile-o8_l2-tiny-mp2dp1-")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "profile")] == [
        "profile/rank0",
        "profile/rank1",
    ]


# GPU only (memory snapshot, out-of-memory): tests/forecast/test_gpu_forecast.py, free of MLflow
# so that a bare GPU machine runs them.
