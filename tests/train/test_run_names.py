"""Training runs are named after what they train and how: graph, model, layout, start time."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from squall.train.runner import open_tracking_run

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_training_run_names_tell_layouts_apart(tmp_path, mlflow_schema_db):
    (tmp_path / "mlflow" / "mlruns").mkdir(parents=True)
    shutil.copy(mlflow_schema_db, tmp_path / "mlflow" / "mlruns" / "mlflow.db")
    names = []
    for mp, world in ((1, 1), (2, 4)):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[
                f"paths.cache={tmp_path}", f"parallel.model_parallel={mp}",
                f"training.run_dir={tmp_path}/run{mp}"])  # fmt: skip
        logger, attempt = open_tracking_run(cfg, tmp_path / "mlflow", world_size=world)
        with logger:
            run_id, uri = logger.run_id, logger.tracking_uri
        assert attempt == 1
        names.append(MlflowClient(tracking_uri=uri).get_run(run_id).info.run_name)
    graph, model = cfg.graph.name, cfg.model.name
    assert re.fullmatch(rf"train-{graph}-{model}-mp1dp1-\d{{8}}T\d{{6}}", names[0]), names
    assert re.fullmatch(rf"train-{graph}-{model}-mp2dp2-\d{{8}}T\d{{6}}", names[1]), names
