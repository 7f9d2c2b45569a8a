"""A local sweep builds its graph and dataset in the driver, where their progress shows."""

from __future__ import annotations

from pathlib import Path

from _scale_helpers import TINY, compose_scale

from squall.scaling.sweep import prepare_inputs


def test_the_driver_prepares_graph_and_dataset_of_a_local_sweep(tmp_path):
    cfg = compose_scale(*TINY, f"paths.cache={tmp_path}", hydra=True)
    prepare_inputs(cfg)
    assert list((tmp_path / "graphs").glob("o8_l2-*.npz"))
    assert Path(str(cfg.data.path)).is_dir()


def test_nothing_is_prepared_when_the_sweep_varies_the_graph_or_off_the_local_cluster(tmp_path):
    swept = compose_scale(*TINY, f"paths.cache={tmp_path}", hydra=True)
    swept.hydra.sweeper.params = {"graph.nodes.hidden.level": "2,3"}
    prepare_inputs(swept)
    slurm = compose_scale(*TINY, f"paths.cache={tmp_path}", "cluster=local_slurm", hydra=True)
    prepare_inputs(slurm)
    assert not (tmp_path / "graphs").exists()
