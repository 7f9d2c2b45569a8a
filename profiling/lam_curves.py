"""Limited-area forecast skill per lead time: driven (with and without lookahead), free, cut-out.

    PYTHONPATH=src .venv/bin/python profiling/lam_curves.py [--steps 300] [--cache DIR]
        [--jobs 2] [--override KEY=VALUE ...]

Trains ``graph=lam_alps`` three ways with ``jobs.train`` and scores each with ``jobs.forecast``
(8 steps to 48 h, 8 test starts, RMSE inside the domain in normalised units):

* ``forced``: the band forced by the driver, each step also given the driver's band at the time
  it predicts (``data.boundary.lookahead=true``, the default; squall.train.boundary);
* ``forced_no_lookahead``: the band forced, input states only (``lookahead=false``);
* ``cutout``: no driver at all (``data.boundary.enabled=false``), the unforced LAM;

and reports, from the forecasts, each forced model rolled out free (``*_free``: the same model,
nothing forced) and persistence. A run directory that already holds the finished checkpoint is
reused (``training.resume=true``). ``--override`` adds Hydra overrides to every variant (named in
the table); ``--jobs`` trains that many variants at once (one GPU holds several of these small
models). Rows to results/lam_curves.csv, table lam_curves.md (``--results``, ``--name``). Runs on
a GPU as it does on CPUs (``training.device=auto``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, machine_info, write_rows  # noqa: E402

from squall.train.signals import STOPPED_EXIT_CODE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "forced": ["data.boundary.lookahead=true"],
    "forced_no_lookahead": ["data.boundary.lookahead=false"],
    "cutout": ["data.boundary.enabled=false"],
}
#: Issue targets: the forced LAM at least 30 % better than the unforced one at 24 h, and ahead of
#: persistence at every lead to 48 h.
GAIN_TARGET, GAIN_LEAD_H = 0.30, 24.0


def run(cmd: list[str], env: dict, log: Path, seconds: float | None = None) -> str:
    """Run ``cmd``, its stderr to ``log``; return its stdout. With ``seconds``, a job still running
    then gets SIGTERM: a training job checkpoints and stops (exit status STOPPED, accepted)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=fh,
                                text=True)  # fmt: skip
        try:
            out, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate()
        fh.write(out)
    if proc.returncode not in (0, STOPPED_EXIT_CODE if seconds else 0):
        sys.exit(f"{' '.join(cmd)} failed (rc {proc.returncode}); see {log}")
    print(f"  {cmd[2]} done in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300, help="training steps per variant")
    p.add_argument("--rollout", type=int, default=2)
    p.add_argument("--layers", type=int, default=4, help="model.processor_layers")
    p.add_argument("--starts", type=int, default=8)
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "squall")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every variant")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once")
    p.add_argument("--workers", type=int, default=0, help="data loader workers per job")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="stop a training job after this long (it checkpoints; the steps it "
                   "reached are reported)")  # fmt: skip
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the csv and md")
    p.add_argument("--name", default="lam_curves", help="file name of the csv and md")
    args = p.parse_args()
    env = {**os.environ, "SQUALL_CACHE": str(args.cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    common = ["graph=lam_alps", f"model.processor_layers={args.layers}", f"data.num_workers={args.workers}",
              "tracking.enabled=false", *args.override]  # fmt: skip
    logs = args.cache / "lam_curves"
    logs.mkdir(parents=True, exist_ok=True)
    curves, reused, trained, lock = {}, [], {}, threading.Lock()
    if args.jobs > 1:  # the graph and dataset written once, before the variants share them
        run([sys.executable, "-m", "jobs.make_dataset", *common], env, logs / "dataset.log")

    def variant(name: str) -> None:
        run_dir = args.cache / "runs" / f"{args.name}-{name}"
        print(f"{name}: {run_dir}", flush=True)
        over = [*common, *VARIANTS[name], f"training.run_dir={run_dir}"]
        if (run_dir / "checkpoint.pt").exists():
            reused.append(name)
        run([sys.executable, "-m", "jobs.train", *over, f"training.max_steps={args.steps}",
             f"training.rollout={args.rollout}", f"training.val_every={args.steps}",
             f"training.checkpoint_every={args.steps}", "training.resume=true"],
            env, logs / f"train-{args.name}-{name}.log", args.train_seconds)  # fmt: skip
        out = run([sys.executable, "-m", "jobs.forecast", *over, "forecast.steps=8",
                   f"forecast.max_starts={args.starts}"], env,
                  logs / f"forecast-{args.name}-{name}.log")  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        with lock:  # after each variant: a cut-short run keeps what it has
            trained[name] = result["checkpoint_step"]
            curves["persistence"] = result["rmse_persistence"]
            curves[name] = result["rmse_model"]
            if result.get("rmse_model_unforced"):
                curves[f"{name}_free"] = result["rmse_model_unforced"]
            order = ["persistence", *(c for v in args.variants for c in (v, f"{v}_free"))]
            write({c: curves[c] for c in order if c in curves}, result["lead_hours"], args,
                  reused, trained)  # fmt: skip

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for future in [pool.submit(variant, name) for name in args.variants]:
            future.result()


def write(curves: dict, lead: list, args, reused: list, trained: dict) -> None:
    """Rows to ``<results>/<name>.csv`` and the table ``<name>.md``."""
    info = machine_info()

    def steps(curve: str) -> int:  # the steps a variant trained (fewer when stopped by the clock)
        return trained.get(curve.removesuffix("_free"), args.steps)

    rows = [{"curve": c, "lead_h": h, "rmse_norm": round(v, 4), "train_steps": steps(c),
             "rollout": args.rollout, "processor_layers": args.layers, "starts": args.starts,
             "overrides": " ".join(args.override), "gpu": info["gpu"], "date": info["date"],
             "git": info["git"]}
            for c, values in curves.items() for h, v in zip(lead, values, strict=True)]  # fmt: skip
    stopped = {c: n for c, n in trained.items() if n < args.steps}
    out = write_rows(args.results / f"{args.name}.csv", rows)
    lines = ["# lam_alps forecast skill per lead time", "",
             f"Generated by `profiling/lam_curves.py` (git {info['git']}, {info['date']} UTC, "
             f"{info['cpus']} CPUs, GPU {info['gpu']}): {args.layers} processor layers, rollout {args.rollout}, {args.steps} training steps per variant"
             + (f" (stopped at {args.train_seconds:g} s: "
                + ", ".join(f"{c} {n}" for c, n in stopped.items()) + ")" if stopped else "")
             + f"; {args.starts} test starts; RMSE inside the domain, normalised units (mean over the prognostic "
             "variables' MSE, root). `*_free`: the same model rolled out with nothing forced.",
             *([f"Overrides of every variant: `{' '.join(args.override)}`."]
               if args.override else []),
             f"Command: `python profiling/lam_curves.py {' '.join(sys.argv[1:])}`.",
             *([f"Run directories found with a checkpoint and resumed (trained before with "
                f"these settings): {', '.join(reused)}."] if reused else []), "",
             "| curve | " + " | ".join(f"{h:g} h" for h in lead) + " |",
             "|---|" + "---|" * len(lead)]  # fmt: skip
    for c, values in curves.items():
        lines.append(f"| {c} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    k = lead.index(GAIN_LEAD_H)
    lines.append("")
    if "cutout" in curves:
        for c in ("forced", "forced_no_lookahead"):
            if c in curves:
                gain = 1 - curves[c][k] / curves["cutout"][k]
                ahead = all(m < q for m, q in zip(curves[c], curves["persistence"], strict=True))
                met = "met" if gain >= GAIN_TARGET else "missed"
                lines.append(f"- {c} vs cutout at {GAIN_LEAD_H:g} h: {gain:+.1%} "
                             f"(target {GAIN_TARGET:.0%}: {met}); "
                             f"ahead of persistence at every lead to {lead[-1]:g} h: "
                             f"{'yes' if ahead else 'no'}")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
