"""Profile training or forecast steps: a trace, kernel and component tables, a memory snapshot.

    python -m jobs.profile                                    # tiny model on CPU
    python -m jobs.profile graph=o96_l6 model=o96             # one GPU
    python -m jobs.profile profile.mode=forecast forecast.cuda_graphs=true
    srun -n 2 python -m jobs.profile parallel.model_parallel=2

Runs ``profile.warmup_steps`` steps, then records ``profile.steps`` under ``torch.profiler`` and
writes, per rank, into ``profile.output/rank<N>/`` (default: the job's Hydra folder):
``trace.json`` (Perfetto), ``kernels.csv`` (time, TFLOP/s and GB/s against the rates measured on
the device), ``components.csv`` (encoder, processor, decoder, optimiser, communication, other)
and, on a GPU, ``memory_snapshot.pickle`` (https://pytorch.org/memory_viz; also written when the
steps run out of memory, the error names it). Rank 0 logs every rank's files as artifacts of
one MLflow run and prints the component table and one JSON line. profiling/README.md says how
to open each file.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig

from jobs._entry import distributed_job, hydra_job
from squall.profiler import profile_job


def format_table(result: dict) -> str:
    """Per-component seconds per step of rank 0, the busiest kernels and where the files are."""
    step = result["step_s"]
    lines = [f"{result['mode']} step on {result['world']} rank(s): {step * 1e3:.1f} ms "
             f"(median of the recorded steps, rank 0)",
             f"{'component':<15}{'ms/step':>10}{'share':>8}"]  # fmt: skip
    for name, seconds in result["components"].items():
        share = 100 * seconds / step if step > 0 else 0.0
        lines.append(f"{name:<15}{seconds * 1e3:>10.2f}{share:>7.1f}%")
    rates = result["rates"]
    lines += ["", f"busiest kernels (device rates measured now: {rates['matmul_tflops']:.3g} "
              f"TFLOP/s {rates['matmul_dtype']} matmul, {rates['copy_GBps']:.3g} GB/s copy):"]  # fmt: skip
    for row in result["kernels"][:8]:
        extra = []
        if row["tflops"] is not None:
            extra.append(f"{row['tflops']:.3g} TFLOP/s")
        if row["input_GBps"] is not None:
            extra.append(f"{row['input_GBps']:.3g} GB/s in")
        lines.append(f"  {row['total_ms']:>9.2f} ms {row['share_pct'] or 0:>5.1f}%  "
                     f"{row['name'][:70]}{'  (' + ', '.join(extra) + ')' if extra else ''}")  # fmt: skip
    lines.append("")
    lines.append("files: " + ", ".join(str(p) for p in result["files"].values()))
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run {result['mlflow_run_id']} in {result['tracking_uri']} "
                     "(artifacts profile/rank<N>/)")  # fmt: skip
    return "\n".join(lines)


@hydra_job("profile")
def main(cfg: DictConfig) -> dict:
    with distributed_job(cfg) as env:
        result = profile_job(cfg)
    if env.rank == 0:
        print(format_table(result))
        summary = {k: v for k, v in result.items() if k not in ("kernels", "files")}
        summary["files"] = {k: str(v) for k, v in result["files"].items()}
        print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
