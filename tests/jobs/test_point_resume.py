"""A point stopped by a signal checkpoints, and the rerun resumes it: training continues from the
checkpoint, warm-up is repeated and every timed step is timed again in the new allocation (timings
from one allocation only); the same run records both attempts."""

from __future__ import annotations

import signal

import pytest
from _scale_helpers import TINY, compose_scale

from squall.scaling.point import PointInterrupted, run_point
from squall.scaling.sweep import INTERRUPT_TAG
from squall.tracking import NullLogger
from squall.train.loop import Trainer

LAUNCHER_VARIABLES = ("SLURM_PROCID", "SLURM_JOB_ID", "SUBMITIT_EXECUTOR", "RANK", "WORLD_SIZE",
                      "TORCHELASTIC_RUN_ID", "SUBMITIT_LOCAL_GLOBALID")


class RecordingLogger(NullLogger):
    """Keeps what a point logs, across attempts (as its one MLflow run would)."""

    def __init__(self):
        self.metrics, self.tags, self.finished = [], {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def finish(self, status="FINISHED"):
        self.finished.append(status)


def test_signal_checkpoints_and_rerun_resumes(tmp_path, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_scale(*TINY, "scale.warmup_steps=1", "scale.steps=5", "scale.checkpoint_every=100",
                        f"paths.cache={tmp_path}", f"training.run_dir={tmp_path / 'run'}")
    logger = RecordingLogger()
    original = Trainer.train_step

    def signalled_at_step_3(self, batch):
        out = original(self, batch)
        if self.step == 3:  # Slurm's warning arrives during the third step
            signal.raise_signal(signal.SIGUSR1)
        return out

    monkeypatch.setattr(Trainer, "train_step", signalled_at_step_3)
    with pytest.raises(PointInterrupted, match=r"SIGUSR1 at step 3; checkpoint .*checkpoint.pt"):
        run_point(cfg, lambda env, plan: logger, point_id="sweep-a#0")
    assert logger.finished == ["KILLED"] and "SIGUSR1 at step 3" in logger.tags[INTERRUPT_TAG]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert [step for step, m in logger.metrics if "time/last_step_s" in m] == [1, 2, 3]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers given back

    monkeypatch.setattr(Trainer, "train_step", original)
    summary = run_point(cfg, lambda env, plan: logger, point_id="sweep-a#0")
    assert logger.finished == ["KILLED", "FINISHED"] and logger.tags["point.attempts"] == "2"
    steps = [(step, m["time/timed"]) for step, m in logger.metrics if "time/last_step_s" in m]
    # Attempt 1: step 1 warm-up, 2-3 timed. Attempt 2 resumes at 3: step 4 warm-up, then all
    # 5 timed steps again (5-9): the summary is attempt 2's alone.
    assert steps == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 0.0)] + [(s, 1.0) for s in range(5, 10)]
    assert summary["time/measured_steps"] == 5
    # The summary is attempt 2's logged timed steps (5-9), each the global batch (one rank).
    timed = [m["time/last_step_s"] for step, m in logger.metrics[-6:] if step >= 5
             and "time/last_step_s" in m]
    assert len(timed) == 5
    batch = int(cfg.scale.batch)
    assert summary["throughput/samples_per_s"] == pytest.approx(batch * 5 / sum(timed), rel=1e-9)
    assert summary["time/step_s"] == pytest.approx(sorted(timed)[2], rel=1e-12)
    assert summary["time/comm_s"] == 0.0  # one rank: no gradient all-reduce
    # Each attempt's own numbers stay on the run.
    assert logger.tags["attempt.1.ended"] == "stopped (SIGUSR1) at step 3"
    assert logger.tags["attempt.1.timed_steps"] == "2" and logger.tags["attempt.1.first_step"] == "1"
    assert logger.tags["attempt.2.ended"] == "completed"
    assert logger.tags["attempt.2.timed_steps"] == "5" and logger.tags["attempt.2.first_step"] == "4"
    # The tag is written with 6 significant digits: relative rounding error at most 5e-6.
    assert float(logger.tags["attempt.2.step_s"]) == pytest.approx(summary["time/step_s"],
                                                                    rel=5e-6)
    assert logger.tags["attempt.1.start"] <= logger.tags["attempt.1.end"] <= \
        logger.tags["attempt.2.start"]

    # A later sweep into the same directory does not resume this point's checkpoint.
    fresh = RecordingLogger()
    run_point(cfg, lambda env, plan: fresh, point_id="sweep-b#0")
    assert [step for step, m in fresh.metrics if "time/last_step_s" in m] == [1, 2, 3, 4, 5, 6]
    assert fresh.tags["point.attempts"] == "1"


def test_signal_during_the_build_stops_after_the_first_step(tmp_path, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cfg = compose_scale(*TINY, f"paths.cache={tmp_path}", f"training.run_dir={tmp_path / 'run'}")
    from squall.scaling import point as point_module

    original = point_module.build_run

    def build_then_signal(*args, **kwargs):
        parts = original(*args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # e.g. scancel while the graph was being built
        return parts

    monkeypatch.setattr(point_module, "build_run", build_then_signal)
    logger = RecordingLogger()
    with pytest.raises(PointInterrupted, match="SIGTERM at step 1"):
        run_point(cfg, lambda env, plan: logger)
    assert logger.finished == ["KILLED"] and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stand_alone_point_continues_its_mlflow_run_only_from_its_checkpoint(tmp_path):
    """jobs/slurm/scale.sbatch requeued: the same run directory, a checkpoint in it, one run."""
    from omegaconf import open_dict

    from squall.scaling.sweep import point_logger

    cfg = compose_scale(f"paths.cache={tmp_path}/cache")
    with open_dict(cfg):
        cfg.training.run_dir = str(tmp_path / "run")
    first = point_logger(cfg, None, None, "point")
    first.finish("KILLED")
    no_checkpoint = point_logger(cfg, None, None, "point")  # nothing to resume: a new run
    no_checkpoint.finish()
    assert no_checkpoint.run_id != first.run_id
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    resumed = point_logger(cfg, None, None, "point")
    resumed.finish()
    assert resumed.run_id == no_checkpoint.run_id
