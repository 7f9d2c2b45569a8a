"""Metric names, the step timer, peak memory windows, own-GPU sampling and the run environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from squall.tracking import metrics
from squall.tracking.environment import collect_environment, git_revision
from squall.tracking.metrics import GpuSampler, StepTimer, own_gpu_ids, peak_memory

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    """A clock that advances by the durations it is given, one per step."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = iter(durations)
        self.started = False

    def __call__(self):
        if self.started:
            self.now += next(self.durations)
        self.started = not self.started
        return self.now


def test_metric_names_carry_units():
    names = {k: v for k, v in vars(metrics).items() if k.isupper() and isinstance(v, str)
             and "/" in v}
    assert len(set(names.values())) == len(names), "two constants share a metric name"
    for const, name in names.items():
        unit = re.search(r"[_/](s|GiB|per_s|per_s_per_gpu|pct|GBps|bytes_per_step|"
                         r"gflop_per_sample|normalised)$", name)
        unitless = const in {"LOSS_TRAIN", "LOSS_VAL", "LOSS_VAL_PROGNOSTIC",
                             "LOSS_VAL_PERSISTENCE", "SKILL_VS_PERSISTENCE", "LR", "GRAD_NORM",
                             "STEP_SPREAD", "STEP_TIMED", "MEASURED_STEPS", "HALO_ROWS_SENT",
                             "EDGE_IMBALANCE", "NODE_IMBALANCE", "COMM_SHARE", "MODEL_PARAMETERS",
                             "FORECAST_SKILL", "FORECAST_SPREAD_SKILL", "FORECAST_CRPS_GAIN"}
        assert unit or unitless, f"{const}={name!r} has no unit suffix"
    assert metrics.per_rank(metrics.PEAK_ALLOCATED_GIB, 3) == "memory/peak_allocated_GiB/rank3"


def test_step_timer_excludes_warmup_and_reports_spread():
    # Two slow warm-up steps (compilation), then 10 steps of 1.0 .. 1.9 s.
    durations = [50.0, 20.0] + [1.0 + 0.1 * i for i in range(10)]
    timer = StepTimer(warmup=2, sync=lambda: None, clock=FakeClock(durations))
    for _ in durations:
        with timer.step(samples=4):
            pass
    stats = timer.stats()
    assert stats.steps == 10
    assert stats.median_s == pytest.approx(1.45)
    assert stats.p10_s == pytest.approx(1.09) and stats.p90_s == pytest.approx(1.81)
    assert stats.spread == pytest.approx((1.81 - 1.09) / 1.45)
    assert stats.samples_per_s == pytest.approx(40 / sum(durations[2:]))
    out = stats.as_metrics()
    assert out[metrics.STEP_S] == stats.median_s and out[metrics.MEASURED_STEPS] == 10


def test_step_timer_new_window_keeps_warmup_done():
    timer = StepTimer(warmup=1, sync=lambda: None)
    with pytest.raises(ValueError, match="no step measured"):
        timer.stats()
    for seconds in (9.0, 1.0, 3.0):
        timer.record(seconds, samples=2)
    assert timer.stats().median_s == 2.0
    timer.reset()
    timer.record(5.0)
    assert timer.stats().steps == 1 and timer.stats().median_s == 5.0


def test_peak_memory_window():
    if torch.cuda.is_available():
        torch.cuda.init()
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB
        del x
        first = peak_memory()  # this window saw x; a reset restarts from what is allocated now
        second = peak_memory()  # this one did not
        assert first[metrics.PEAK_ALLOCATED_GIB] >= 0.25
        assert second[metrics.PEAK_ALLOCATED_GIB] < first[metrics.PEAK_ALLOCATED_GIB]
    else:
        ballast = bytearray(64 * 2**20)  # the peak covers at least this much
        rss = peak_memory()[metrics.PEAK_RSS_GIB]
        assert rss >= 64 / 1024
        del ballast


def test_own_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-1234abcd")
    assert own_gpu_ids() == ["2", "GPU-1234abcd"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert own_gpu_ids() == []


def test_gpu_sampler():
    sampler = GpuSampler(interval_s=0.05)
    with sampler:
        sampler.sample()
    values = sampler.collect()
    if not torch.cuda.is_available():
        assert not sampler.enabled and values == {}
    else:
        assert sampler.enabled
        assert any(k.startswith(metrics.GPU_MEMORY_USED_GIB) for k in values)
        assert sampler.collect() == {}  # a new window starts empty


def test_environment_records_versions_and_revision():
    env = collect_environment()
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["gpu_count"] == str(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip(f"{REPO} is not a git checkout")
    assert env["git_sha"] == head
    assert env["git_dirty"] in ("true", "false")
    for key in ("triton", "cuda", "nccl", "gpu_name", "hostname"):
        assert env[key]


def test_git_revision_override_and_outside_a_checkout(monkeypatch, tmp_path):
    assert git_revision(tmp_path) == ("unknown", None)
    monkeypatch.setenv("SQUALL_GIT_SHA", "abc123")
    assert git_revision() == ("abc123", None)
