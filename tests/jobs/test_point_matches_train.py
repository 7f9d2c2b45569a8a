"""A scaling point and ``jobs.train`` run one training loop: on the same config (tiny CPU model, same
seed, same data) they log the same loss sequence to MLflow, and the timing names they share mean
the same thing in both runs."""

from __future__ import annotations

import re
import statistics
import sys

import pytest
from _scale_helpers import CONF, REPO, TINY, compose_scale
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from squall.scaling.point import run_point
from squall.scaling.sweep import point_logger
from squall.tracking import metrics as M
from squall.train.signals import StopSignals

sys.path.insert(0, str(REPO))  # jobs/ is a directory of the repository, not an installed package
from jobs.train import run as train_job  # noqa: E402

pytestmark = pytest.mark.slow  # two builds and an MLflow store: 20 to 40 s on 2 loaded cores

LAUNCHER_VARIABLES = (
    "SLURM_PROCID",
    "SLURM_JOB_ID",
    "SUBMITIT_EXECUTOR",
    "RANK",
    "WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "SUBMITIT_LOCAL_GLOBALID",
    "MLFLOW_TRACKING_URI",
)
# Global batch 2 on one rank, 1 warm-up + 3 timed steps: jobs.train gets the same batch, step
# budget (the learning-rate schedule's length) and timing warm-up through training.*.
SHARED = [o for o in TINY if not o.startswith("scale.")] + [
    "training.log_every=1",
    "training.warmup_steps=2",
]
POINT = ["scale.batch=2", "scale.warmup_steps=1", "scale.steps=3"]
TRAIN = ["training.batch_size=2", "training.max_steps=4", "training.timing_warmup_steps=1"]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [
        (m.step, m.value)
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    ]


def known_name(key: str) -> bool:
    """Whether ``key`` is a name of :mod:`squall.tracking.metrics`, or one's per-rank, per-GPU or
    per-node form (``.../rank3``, ``.../gpu0/node1``)."""
    names = {v for k, v in vars(M).items() if k.isupper() and isinstance(v, str)}
    for _ in range(3):
        if key in names:
            return True
        key = re.sub(r"/(rank|gpu|node)\d+$", "", key)
    return False


def test_a_point_and_jobs_train_log_the_same_losses(tmp_path, monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cache = f"paths.cache={tmp_path}"
    point_cfg = compose_scale(*SHARED, *POINT, cache, f"training.run_dir={tmp_path}/point")
    loggers = []

    def factory(env, plan):
        loggers.append(point_logger(point_cfg, None, None, "point"))
        return loggers[-1]

    # The point first: it sets torch's thread count from OMP_NUM_THREADS, and the training that
    # follows in this process runs with the same count (the same reduction order on CPU).
    run_point(point_cfg, factory)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        train_cfg = compose(
            "config", [*SHARED, *TRAIN, cache, f"training.run_dir={tmp_path}/train"]
        )
    with StopSignals() as stop:  # what jobs.train's main does around its run
        _, stopped_by, logger = train_job(train_cfg, stop)
    assert stopped_by is None

    client = MlflowClient(loggers[0].tracking_uri)
    runs = {"point": loggers[0].run_id, "train": logger.run_id}
    assert loggers[0].tracking_uri == logger.tracking_uri and len(set(runs.values())) == 2
    losses = {k: history(client, r, M.LOSS_TRAIN) for k, r in runs.items()}
    assert [s for s, _ in losses["point"]] == [1, 2, 3, 4]
    # The same operations on the same numbers in one process: bitwise equal, not merely close
    # (MLflow stores a Python float as a double, exactly).
    assert losses["point"] == losses["train"]
    assert len({v for _, v in losses["point"]}) == 4, "a real sequence, not a constant"

    for kind, run_id in runs.items():
        metrics = client.get_run(run_id).data.metrics
        unknown = sorted(k for k in metrics if not known_name(k))
        assert not unknown, f"{kind} logs names that are not in squall.tracking.metrics: {unknown}"
        # The summary is made of the steps each run logged: median and throughput of the steps
        # flagged timed (warm-up left out), each step counting the global batch of 2.
        flags = dict(history(client, run_id, M.STEP_TIMED))
        step_s = dict(history(client, run_id, M.LAST_STEP_S))
        timed = [step_s[s] for s in sorted(step_s) if flags[s] == 1.0]
        assert sorted(flags) == [1, 2, 3, 4] and [flags[s] for s in (1, 2)] == [0.0, 1.0]
        assert metrics[M.MEASURED_STEPS] == len(timed) == 3
        assert metrics[M.STEP_S] == pytest.approx(statistics.median(timed), rel=1e-12)
        assert metrics[M.SAMPLES_PER_S] == pytest.approx(2 * len(timed) / sum(timed), rel=1e-9)
