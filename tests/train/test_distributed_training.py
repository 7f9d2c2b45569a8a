"""jobs.train in several CPU processes (gloo), launched as srun would, against one process."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from squall.tracking import local_store_uri

ROOT = Path(__file__).resolve().parents[2]


def slurm_env(rank: int, world: int, job_id: str) -> dict:
    """The variables srun gives task ``rank`` of a one-node step."""
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(world),
            "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_STEP_TASKS_PER_NODE": str(world)}  # fmt: skip


def launch(cache: Path, overrides: list[str], world: int) -> list[subprocess.CompletedProcess]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    base.update(SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1")
    job_id = str(uuid.uuid4().int % 10**8)
    procs = []
    for rank in range(world):
        env = {**base, **(slurm_env(rank, world, job_id) if world > 1 else {})}
        cmd = [sys.executable, "-m", "jobs.train", *overrides, f"hydra.run.dir={cache}/hydra{rank}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def history(cache: Path, key: str) -> list[float]:
    client = MlflowClient(local_store_uri(cache / "mlflow"))
    exp = client.get_experiment_by_name("squall")
    (run,) = client.search_runs([exp.experiment_id])
    return [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    ]


@pytest.mark.slow  # 26-33 s each: two job processes and one reference (gradient sync is
# covered in the default run by tests/parallel/test_gradient_sync.py)
@pytest.mark.parametrize(
    "layout, reference",
    [
        # two ranks share each sample's graph: same maths as one process, batch 1
        (["parallel.model_parallel=2"], ["training.batch_size=1"]),
        # two data-parallel replicas of batch 1: same samples and maths as one process of batch 2
        (["parallel.model_parallel=1"], ["training.batch_size=2"]),
    ],
    ids=["model_parallel_2", "data_parallel_2"],
)
def test_two_ranks_match_one_process(tmp_path, tiny_overrides, layout, reference):
    common = [a for a in tiny_overrides(tmp_path) if not a.startswith("paths.cache")]
    common += ["training.max_steps=4", "training.val_every=4", "training.deterministic=true"]
    one = launch(tmp_path / "one", [*common, *reference], world=1)
    two = launch(tmp_path / "two", [*common, "training.batch_size=1", *layout], world=2)
    assert '"summary"' in one[0].stdout and '"summary"' in two[0].stdout
    assert '"summary"' not in two[1].stdout, "only rank 0 reports"
    expected, got = history(tmp_path / "one", "loss/train"), history(tmp_path / "two", "loss/train")
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-4), (got, expected)
    halo = history(tmp_path / "two", "halo/bytes_per_step")
    if "parallel.model_parallel=2" in layout:
        assert len(halo) == 4 and min(halo) > 0, "the graph really was split over the two ranks"
    else:
        assert halo == []
