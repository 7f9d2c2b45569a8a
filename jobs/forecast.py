"""Roll a trained model out from held-out initial states and score it against persistence.

    python -m jobs.forecast                                  # the run trained by jobs.train
    python -m jobs.forecast forecast.steps=40 forecast.output=/tmp/fc.zarr

Use the same graph/model/data overrides as the training run: a checkpoint trained on another graph
or model is refused in one line. Prints the checkpoint it evaluates (path, step, MLflow run), a
table per lead time of the model's and persistence's RMSE over the prognostic variables in
normalised units (dimensionless) and the skill, each variable's RMSE in its own units, where the
scores went (a CSV beside the checkpoint, an MLflow run with step = lead time in hours), and one
JSON line.

Several processes (``srun`` with one task per GPU, or torchrun) share the rollout as in training:
``parallel.model_parallel`` ranks split each start's graph (same partition and halo exchange),
the remaining factor of the world size are replicas that take every n-th start;
``parallel.chunks`` runs the encoder and decoder in pieces to cap memory. Rank 0 reports.
``forecast.precision`` (bf16 autocast on GPU by default), ``forecast.cuda_graphs``,
``forecast.output`` (zarr, written in the background; ``squall.train.forecast_store``) and
``forecast.compression`` are in ``conf/forecast/default.yaml``.

Exit status: 0 done; 2 bad input, one line ``error: ...``; 75 stopped by SIGTERM (``scancel``,
preemption) or SIGUSR1 (Slurm's time-limit warning): the fields computed so far are written and
the store says how many (``complete: false``).
"""

from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from jobs._entry import distributed_job, hydra_job
from squall.train.boundary import format_lam
from squall.train.forecast import forecast
from squall.train.signals import STOPPED_EXIT_CODE, Stopped


def format_table(result: dict) -> str:
    """Scores per lead time: normalised RMSE and skill, then each variable in its own units."""
    inside = " inside the domain" if "boundary_points" in result else ""
    lines = [f"RMSE over the prognostic variables{inside}, normalised units (dimensionless):",
             f"{'lead h':>7}{'rmse model':>12}{'rmse persist':>14}{'skill':>8}"]  # fmt: skip
    for h, m, p, s in zip(result["lead_hours"], result["rmse_model"], result["rmse_persistence"],
                          result["skill"], strict=True):  # fmt: skip
        lines.append(f"{h:>7.0f}{m:>12.4f}{p:>14.4f}{s:>8.3f}")
    if result.get("members", 1) > 1 or "crps_reference" in result:
        lines += ["", f"CRPS (normalised units) of the model ({result.get('members', 1)} members"
                  "; fair CRPS), persistence and the reference, and the ensemble's spread/skill:",
                  f"{'lead h':>7}{'crps model':>12}{'crps persist':>14}{'crps ref':>10}"
                  f"{'gain':>8}{'rmse ref':>10}{'spread/skill':>14}"]  # fmt: skip
        for s, h in enumerate(result["lead_hours"]):
            def cell(key, width, s=s):
                return f"{result[key][s]:>{width}.4f}" if key in result else f"{'-':>{width}}"

            lines.append(f"{h:>7.0f}{cell('crps_model', 12)}{cell('crps_persistence', 14)}"
                         f"{cell('crps_reference', 10)}{cell('crps_gain', 8)}"
                         f"{cell('rmse_reference', 10)}{cell('spread_skill', 14)}")  # fmt: skip
    names = list(result.get("rmse_by_variable", {}))
    if names:
        width = max(10, *(len(n) + 2 for n in names))
        lines += ["", "RMSE of the model per variable, in the variable's own units:",
                  f"{'lead h':>7}" + "".join(f"{n:>{width}}" for n in names)]  # fmt: skip
        for s, h in enumerate(result["lead_hours"]):
            lines.append(f"{h:>7.0f}" + "".join(
                f"{result['rmse_by_variable'][n][s]:>{width}.4g}" for n in names))  # fmt: skip
    if "boundary_points" in result:  # a limited-area model: inside the domain, forced or not
        lines += ["", format_lam(result)]
    memory = ", ".join(f"{k.rsplit('/', 1)[-1].removesuffix('_GiB').replace('_', ' ')} {v:.3g} GiB"
                       for k, v in result.get("memory", {}).items())  # fmt: skip
    lines.append(f"{result['starts']} starts on {result.get('ranks', 1)} rank(s), "
                 f"{result.get('precision', 'fp32')}{', CUDA graph' if result.get('cuda_graph') else ''}: "
                 f"{result['step_s_median'] * 1e3:.1f} ms per step, {result.get('total_s', 0):.2f} s "
                 f"in all (writer wait {result.get('write_wait_s', 0):.2f} s); {memory}")  # fmt: skip
    if result.get("output"):
        lines.append(f"forecasts: {result['output']}")
    where = [f"scores: {result['csv']}"] if result.get("csv") else []
    if result.get("mlflow_run_id"):
        where.append(f"MLflow run {result['mlflow_run_id']} in {result['tracking_uri']}")
    if where:
        lines.append("; ".join(where))
    return "\n".join(lines)


@hydra_job()
def main(cfg: DictConfig) -> dict:
    with distributed_job(cfg) as env:
        try:
            result = forecast(cfg)
        except Stopped as err:  # the writer has drained and the store says how far it got
            where = f"; fields so far in {cfg.forecast.output}" if cfg.forecast.output else ""
            print(f"stopped by {err}{where} (attrs complete=false)", file=sys.stderr)
            sys.exit(STOPPED_EXIT_CODE)
    if env.rank == 0:
        print(format_table(result))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
