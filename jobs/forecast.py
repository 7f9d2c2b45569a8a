"""Roll a trained model out from held-out initial states and score it against persistence.

    python -m jobs.forecast                                  # the run trained by jobs.train
    python -m jobs.forecast forecast.steps=40 forecast.output=/tmp/fc.zarr

Use the same graph/model/data overrides as the training run. Prints a table of RMSE (normalised
units, prognostic variables) for the model and persistence per lead time, and one JSON line.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from jobs._entry import user_errors
from squall.train.forecast import forecast


def format_table(result: dict) -> str:
    lines = [f"{'lead h':>7}{'rmse model':>12}{'rmse persist':>14}{'skill':>8}"]
    for h, m, p, s in zip(result["lead_hours"], result["rmse_model"], result["rmse_persistence"],
                          result["skill"], strict=True):  # fmt: skip
        lines.append(f"{h:>7.0f}{m:>12.4f}{p:>14.4f}{s:>8.3f}")
    lines.append(f"{result['starts']} starts, {result['step_s_median'] * 1e3:.1f} ms per step")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@user_errors
def main(cfg: DictConfig) -> dict:
    result = forecast(cfg)
    print(format_table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
