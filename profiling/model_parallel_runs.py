"""jobs.train and jobs.scale model-parallel on 1, 2 and 4 GPUs (or CPU processes), against one process.

    PYTHONPATH=src python profiling/model_parallel_runs.py --device cuda --worlds 1 2 4
    PYTHONPATH=src python profiling/model_parallel_runs.py --device cpu --worlds 1 2 --graph o32_l4

For each world size W, ``jobs.train`` runs under torchrun with ``parallel.model_parallel=W`` (one
process when W = 1), fp32 and deterministic, and its per-step training losses (read back from
the run's MLflow store) are compared with the one-process run: the ranks share each sample's
graph, so the maths is the same up to summation order. Then ``jobs.scale --multirun`` times the
same model, one point per world size, fully model-parallel, with the local launcher. Appends rows
to profiling/results/model_parallel_train.csv and prints the scaling job's table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_rows, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_overrides(args) -> list[str]:
    return [
        f"graph={args.graph}", f"model.num_channels={args.channels}", f"model.num_heads={args.heads}",
        f"model.processor_layers={args.layers}", "model.mlp_ratio=4",
        "model.trainable_edge_features=8", f"model.attention_backend={args.backend}",
        f"data.generator.num_times={args.times}", "data.num_workers=0",
        "data.train.start=0", f"data.train.end={args.times - 21}",
        f"data.validation.start={args.times - 20}", "data.validation.end=-1",
        "data.test.start=-20", "data.test.end=-1",
    ]  # fmt: skip


def run(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - start


def train_losses(cache: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    from squall.tracking import local_store_uri

    client = MlflowClient(local_store_uri(cache / "mlflow"))
    exp = client.get_experiment_by_name("squall")
    (mlrun,) = client.search_runs([exp.experiment_id])
    hist = client.get_metric_history(mlrun.info.run_id, "loss/train")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--graph", default="o96_l6")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", default="triton")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--times", type=int, default=80)
    p.add_argument("--cache", default=None, help="default: a temporary folder")
    p.add_argument("--skip-scale", action="store_true")
    args = p.parse_args()
    cache = Path(args.cache or tempfile.mkdtemp(prefix="squall-mp-"))
    cache.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{env.get('PYTHONPATH', '')}")
    common = [*model_overrides(args), f"training.device={args.device}",
              f"training.max_steps={args.steps}", f"training.val_every={args.steps}",
              "training.log_every=1", "training.deterministic=true", "training.precision=fp32",
              "training.batch_size=1", "training.warmup_steps=2"]  # fmt: skip
    info = machine_info()
    losses, rows = {}, []
    for world in args.worlds:
        where = cache / f"train_w{world}"
        over = [*common, f"paths.cache={where}", f"parallel.model_parallel={world}",
                f"hydra.run.dir={where}/hydra"]  # fmt: skip
        if world == 1:
            cmd = [sys.executable, "-m", "jobs.train", *over]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", "-m", "jobs.train", *over]  # fmt: skip
        seconds = run(cmd, env, cache / f"train_w{world}.log")
        losses[world] = train_losses(where)
        ref = losses[args.worlds[0]]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses[world], ref, strict=True))
        rows.append({**info, "job": "jobs.train", "graph": args.graph, "channels": args.channels,
                     "layers": args.layers, "heads": args.heads, "backend": args.backend,
                     "device": args.device, "model_parallel": world, "steps": args.steps,
                     "precision": "fp32", "loss_first": losses[world][0], "loss_last": losses[world][-1],
                     "max_rel_diff_vs_first_world": rel, "wall_s": round(seconds, 1)})  # fmt: skip
        print(f"jobs.train model_parallel={world}: losses {[round(x, 5) for x in losses[world]]} "
              f"max rel diff vs {args.worlds[0]} process(es) {rel:.2e} ({seconds:.0f} s)", flush=True)  # fmt: skip
    append_rows("model_parallel_train.csv", rows)
    if args.skip_scale:
        return
    where = cache / "scale"
    gpu = args.device == "cuda"
    cmd = [sys.executable, "-m", "jobs.scale", "--multirun", *model_overrides(args),
           f"paths.cache={where}", f"parallel.gpus={','.join(map(str, args.worlds))}",
           "parallel.model_parallel=${parallel.gpus}", "cluster.strong_scaling_batch=1",
           f"cluster.gpus_per_node={max(args.worlds)}", f"cluster.device={args.device}",
           f"cluster.backend={'nccl' if gpu else 'gloo'}", f"training.device={args.device}",
           "scale.warmup_steps=3", "scale.steps=10"]  # fmt: skip
    seconds = run(cmd, env, cache / "scale.log")
    text = (cache / "scale.log").read_text()
    table = text[text.find("|") :] if "|" in text else text[-3000:]
    print(f"jobs.scale ({seconds:.0f} s):\n{table[-6000:]}")


if __name__ == "__main__":
    main()
