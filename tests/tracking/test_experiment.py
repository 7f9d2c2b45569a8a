"""squall's experiments open on their runs table in MLflow's UI; run names tell runs apart."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from squall.tracking import local_store_uri, prepare_store
from squall.tracking.experiment import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    layout_name,
    run_name,
)


@pytest.fixture
def uri(tmp_path, mlflow_schema_db) -> str:
    (tmp_path / "mlruns").mkdir()
    shutil.copy(mlflow_schema_db, tmp_path / "mlruns" / "mlflow.db")
    return local_store_uri(tmp_path)


def test_the_ui_of_the_installed_mlflow_reads_this_kind():
    """The tag and its value are the ones the installed MLflow's UI reads (its JS bundle)."""
    import mlflow

    bundle = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    texts = [p.read_text(errors="ignore") for p in bundle.glob("*.js")]
    assert any(f'"{EXPERIMENT_KIND_TAG}"' in t for t in texts)
    assert any(f'="{EXPERIMENT_KIND}"' in t for t in texts)


def test_a_new_experiment_is_a_model_development_one(uri):
    experiment_id = prepare_store(uri, "squall-test")
    tags = MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_an_older_experiment_gets_the_kind_a_chosen_kind_stays(uri):
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("from-before")
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert prepare_store(uri, "from-before") == old
    assert prepare_store(uri, "chosen") == chosen
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_run_names_tell_graph_model_layout_and_time_apart():
    when = datetime(2026, 11, 30, 10, 12, 5)
    name = run_name("train", "o32_l4", "tiny", layout_name(1, 1), when)
    assert name == "train-o32_l4-tiny-mp1dp1-20261130T101205"
    others = {
        run_name("train", "o96_l6", "tiny", "mp1dp1", when),
        run_name("train", "o32_l4", "o96", "mp1dp1", when),
        run_name("train", "o32_l4", "tiny", layout_name(2, 4), when),
        run_name("train", "o32_l4", "tiny", "mp1dp1", datetime(2026, 11, 30, 10, 12, 6)),
        run_name("forecast", "o32_l4", "tiny", "mp1dp1", when),
    }
    assert len(others) == 5 and name not in others


def test_the_readmes_metric_names_exist_and_cpu_runs_record_theirs():
    """Every metric the README's MLflow and Forecast sections name is a name squall logs; the
    memory metric it names for CPU runs is the one a CPU process records."""
    import re

    import torch

    from squall.tracking import metrics as M

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = readme[readme.index("### MLflow"):readme.index("## Graphs")]
    named = set(re.findall(r"`((?:throughput|time|memory|forecast)/[a-z_A-Z/<>]+)`", text))
    known = {v for v in vars(M).values() if isinstance(v, str) and "/" in v}
    known.add(M.forecast_rmse("<variable>"))
    assert named and named <= known, named - known
    assert M.PEAK_RSS_GIB in named and M.PEAK_ALLOCATED_GIB in named
    if not torch.cuda.is_available():
        assert M.PEAK_RSS_GIB in M.peak_memory()
