"""``jobs.train`` with ``parallel.shard_parameters=true`` on two gloo ranks under torchrun, then
resumed by one process from the sharded checkpoint it left."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# O8 grid, 60 synthetic times, a 16-channel model: the tiny problem of tests/jobs.
TINY = [
    "graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
    "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
    "data.train.start=0", "data.train.end=39", "data.validation.start=40", "data.validation.end=59",
    "data.test.start=40", "data.test.end=59", "model.num_channels=16", "model.num_heads=2",
    "training.checkpoint_every=2", "training.log_every=1", "training.val_every=100",
    "training.device=cpu",
]  # fmt: skip
# Each start imports torch and builds graph, data and model: ~15 s on 2 idle cores, ~60 s loaded.
TIMEOUT_S = 300


@pytest.mark.slow
def test_train_job_sharded_on_two_ranks_resumes_on_one(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    run_dir = tmp_path / "run"
    env = dict(os.environ, SQUALL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    common = [*TINY, f"training.run_dir={run_dir}", "parallel.shard_parameters=true"]
    sharded = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "jobs.train", *common,
               "parallel.model_parallel=2", "training.max_steps=3"]  # fmt: skip
    done = subprocess.run(sharded, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert payload["step"] == 3 and "model" not in payload
    shards = run_dir / payload["shards"]
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp",
                                                        "__1_0.distcp"]  # fmt: skip
    # only the checkpoint's own shards are kept (the step-2 save was replaced)
    assert [p.name for p in shards.parent.iterdir()] == [shards.name]

    single = [sys.executable, "-m", "jobs.train", *common, "training.max_steps=4"]
    done = subprocess.run(single, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "at step 3" in out and "step 4/4 loss" in out, out[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 4
