"""Every bad input is a one-line DataError naming the problem and the fix."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from squall.data.setup import build_dataset, ensure_dataset, synthetic_settings, variable_roles
from squall.data.synthetic import SyntheticSettings, generate
from squall.data.zarr_dataset import WindowDataset, read_info
from squall.errors import DataError
from squall.graphs.grids import grid_from_name

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_dataset_says_how_to_generate(tmp_path):
    with pytest.raises(DataError) as err:
        WindowDataset(tmp_path / "nope.zarr")
    msg = _one_line(err)
    assert "nope.zarr does not exist" in msg
    assert "python -m jobs.make_dataset" in msg


def test_missing_variable_lists_available(small_dataset):
    path, settings = small_dataset
    with pytest.raises(DataError) as err:
        WindowDataset(path, ["msl", "q_700"])
    msg = _one_line(err)
    assert "q_700" in msg and "available: " + ", ".join(settings.variables) in msg


def test_grid_mismatch_names_both_sizes(small_dataset):
    path, _ = small_dataset
    info = read_info(path)
    o24 = grid_from_name("O24")
    with pytest.raises(DataError) as err:
        info.check_grid(len(o24), o24.latlon)
    msg = _one_line(err)
    assert "1600 grid points" in msg and f"number {len(o24)}" in msg
    # Same count, different points: also refused.
    nodes = grid_from_name("O16")
    shifted = nodes.latlon.copy()
    shifted[:, 1] = np.mod(shifted[:, 1] + 0.01, 2 * np.pi)
    with pytest.raises(DataError, match="differ from the graph's data nodes"):
        info.check_grid(len(nodes), shifted)
    info.check_grid(len(nodes), nodes.latlon)  # the right grid passes


def test_too_short_gives_the_numbers(small_dataset):
    path, _ = small_dataset
    with pytest.raises(DataError) as err:
        WindowDataset(path, ["msl"], input_steps=3, rollout=4, start=50, end=55)
    msg = _one_line(err)
    assert "holds 6 times" in msg and "input_steps=3 + rollout=4" in msg and "needs 7" in msg
    with pytest.raises(DataError, match="holds 0 times"):
        WindowDataset(path, ["msl"], start="2031-01-01", end="2031-02-01")
    WindowDataset(path, ["msl"], input_steps=3, rollout=3, start=50, end=55)  # exactly enough


@pytest.mark.parametrize("damage", ["no_data", "garbage_meta", "no_stats", "chunk"])
def test_corrupt_store(tmp_path, small_dataset, damage):
    src, _ = small_dataset
    path = tmp_path / "broken.zarr"
    shutil.copytree(src, path)
    if damage == "no_data":
        shutil.rmtree(path / "data")
    elif damage == "garbage_meta":
        (path / ".zgroup").write_text("{not json")
    elif damage == "no_stats":
        shutil.rmtree(path / "stdev")
    else:
        (path / "data" / "5.0.0.0").write_bytes(b"\x00garbage")
        ds = WindowDataset(path, ["msl"], 1, 1)
        with pytest.raises(DataError) as err:
            for k in range(len(ds)):
                ds[k]
        assert "may be corrupt" in _one_line(err)
        return
    with pytest.raises(DataError) as err:
        WindowDataset(path)
    assert "broken.zarr" in _one_line(err)


def test_bad_timestep_member_and_indices(small_dataset):
    path, _ = small_dataset
    with pytest.raises(DataError, match="not a multiple"):
        WindowDataset(path, ["msl"], timestep="9h")
    with pytest.raises(DataError, match="not understood"):
        WindowDataset(path, ["msl"], timestep="six hours")
    with pytest.raises(DataError, match="member 1"):
        WindowDataset(path, ["msl"], member=1)
    with pytest.raises(DataError, match="grid_indices"):
        WindowDataset(path, ["msl"], grid_indices=[0, 1600])


def test_generator_rejects_unknown_variable(tmp_path, grid):
    with pytest.raises(DataError, match="cannot make"):
        generate(tmp_path / "x.zarr", grid, SyntheticSettings(variables=("msl", "q_700")))
    assert not (tmp_path / "x.zarr").exists()


def test_existing_store_is_not_overwritten(tmp_path, grid):
    s = SyntheticSettings(num_times=3)
    generate(tmp_path / "x.zarr", grid, s)
    with pytest.raises(DataError, match="already exists"):
        generate(tmp_path / "x.zarr", grid, s)
    generate(tmp_path / "x.zarr", grid, s, overwrite=True)


def _cfg(overrides):
    with initialize_config_dir(CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_ensure_dataset_generates_synthetic_once(tmp_path, caplog):
    path = tmp_path / "gen.zarr"
    cfg = _cfg(["graph=o32_l4", f"data.path={path}", "data.generator.num_times=12",
                "data.input_steps=2"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="squall.data.setup"):
        assert ensure_dataset(cfg) == path
    lines = [r.message for r in caplog.records if "generating a synthetic" in r.message]
    assert len(lines) == 1 and "5248 points" in lines[0]
    info = read_info(path)
    assert info.shape == (12, len(cfg.data.variables), 1, 5248)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="squall.data.setup"):
        ensure_dataset(cfg, nodes=grid_from_name("O32"))  # exists and matches: nothing generated
    assert not caplog.records
    with pytest.raises(DataError, match="5248 grid points"):
        ensure_dataset(cfg, nodes=grid_from_name("O16"))
    # Splits from the config: train covers the whole 12-time set (ends on 2020-03-15).
    train = build_dataset(cfg, "train", rollout=1)
    assert len(train) == 12 - 2
    with pytest.raises(DataError, match="holds 0 times"):
        build_dataset(cfg, "test")
    cfg.data.frequency = "3h"
    with pytest.raises(DataError, match="frequency 6h but data.frequency is 3h"):
        build_dataset(cfg, "train")
    roles = variable_roles(cfg, train.variables)
    assert [train.variables[i] for i in roles["diagnostic"]] == ["tp"]
    assert len(roles["prognostic"]) == 6 and len(roles["forcing"]) == 7


def test_ensure_dataset_refuses_missing_real_data(tmp_path):
    cfg = _cfg(["data=zarr", f"data.path={tmp_path / 'era5.zarr'}"])
    with pytest.raises(DataError) as err:
        ensure_dataset(cfg)
    assert "era5.zarr does not exist" in _one_line(err)
    assert not (tmp_path / "era5.zarr").exists()


def test_generator_settings_from_config():
    cfg = _cfg(["data.generator.seed=9", "data.variables=[msl,z]"])
    s = synthetic_settings(cfg.data)
    assert s.seed == 9 and s.variables == ("msl", "z") and s.frequency == "6h"
    with pytest.raises(DataError, match="unknown keys"):
        synthetic_settings(_cfg(["+data.generator.wind=3"]).data)
    with pytest.raises(DataError, match="not among the chosen"):
        variable_roles(_cfg(["data.variables=[msl]"]), ["msl"])


def test_normaliser_must_match_variables(small_dataset):
    path, _ = small_dataset
    train = WindowDataset(path, ["msl", "z_500"], end=40)
    val = WindowDataset(path, ["msl", "z_500"], start=41, normaliser=train.normaliser)
    assert val.normaliser is train.normaliser  # validation uses the training statistics
    with pytest.raises(DataError, match="normaliser variables"):
        WindowDataset(path, ["z_500", "msl"], normaliser=train.normaliser)


def _ensure_in_process(overrides, barrier, delay_s):
    import time

    from squall.data import setup

    real = setup.generate

    def slow_generate(*args, **kwargs):
        # rank i reaches the writer i seconds late (a slower rank of a real job)
        time.sleep(delay_s)
        return real(*args, **kwargs)

    setup.generate = slow_generate
    cfg = _cfg(overrides)
    barrier.wait(timeout=120)  # all start together, as the ranks of a job do
    setup.ensure_dataset(cfg)


@pytest.mark.slow  # 22 s: staggered processes each generate
def test_ranks_generating_at_once_share_one_dataset(tmp_path):
    """Every rank of a fresh distributed job calls ensure_dataset together: one generates, the
    others wait for it (no 'already exists' error, one complete store)."""
    import multiprocessing as mp

    path = tmp_path / "gen.zarr"
    overrides = ["graph=o32_l4", f"data.path={path}", "data.generator.num_times=40"]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_ensure_in_process, args=(overrides, barrier, 1.5 * i))
             for i in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert read_info(path).shape[0] == 40
