"""Datasets are checked for missing and damaged chunks before training; worker errors are one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from squall.data.zarr_dataset import (
    WindowDataset,
    check_chunks,
    make_dataloader,
    worker_message,
)
from squall.errors import DataError


@pytest.fixture
def copy(tmp_path, small_dataset):
    """A private copy of the 60-time O16 dataset (one time per chunk) to damage."""
    src, _ = small_dataset
    path = tmp_path / "copy.zarr"
    shutil.copytree(src, path)
    return path


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_intact_store_passes(copy):
    assert check_chunks(copy) == 60
    assert check_chunks(copy, 10, 19) == 10
    assert check_chunks(copy, decode=True) == 60


def test_missing_chunk_names_store_time_and_date(copy):
    (copy / "data" / "5.0.0.0").unlink()
    with pytest.raises(DataError) as err:
        check_chunks(copy)
    msg = _one_line(err)
    assert str(copy) in msg and "1 of 60 chunks missing" in msg
    assert "time 5 (2020-01-02T06:00:00)" in msg
    assert check_chunks(copy, 6, 59) == 54  # the range in use is all there
    assert check_chunks(copy, 0, 4) == 5


def test_many_missing_chunks_are_counted(copy):
    for t in range(20, 30):
        (copy / "data" / f"{t}.0.0.0").unlink()
    with pytest.raises(DataError) as err:
        check_chunks(copy)
    msg = _one_line(err)
    assert "10 of 60 chunks missing" in msg and "time 24 (" in msg and "and 5 more" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_chunk_is_found_without_decoding(copy, damage):
    chunk = copy / "data" / "7.0.0.0"
    raw = chunk.read_bytes()
    chunk.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00garbage",
                       "empty": b""}[damage])  # fmt: skip
    with pytest.raises(DataError) as err:
        check_chunks(copy)
    msg = _one_line(err)
    assert str(copy) in msg and "1 unreadable" in msg and "time 7 (2020-01-02T18:00:00)" in msg
    if damage == "truncate":
        assert f"{len(raw) // 2} bytes stored, the Blosc header says {len(raw)}" in msg


def test_header_that_lies_about_the_chunk_size(copy):
    """A chunk of another array's shape (copied over) decompresses to the wrong size."""
    chunk = copy / "data" / "3.0.0.0"
    raw = bytearray(chunk.read_bytes())
    raw[4:8] = np.array([123], dtype="<u4").tobytes()
    chunk.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="decompresses to 123 bytes"):
        check_chunks(copy)


def test_zarr3_store_with_multi_time_chunks(tmp_path):
    """Another layout (zarr format 3, zstd, two times per chunk) is read in full to check it."""
    import zarr

    path = tmp_path / "v3.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    data = group.create_array("data", shape=(6, 2, 1, 5), chunks=(2, 2, 1, 5), dtype="f4",
                              fill_value=np.nan)  # fmt: skip
    data[:] = np.arange(60, dtype="f4").reshape(6, 2, 1, 5)
    start = np.datetime64("2021-03-01T00:00", "s")
    group.create_array("dates", data=start + np.arange(6) * np.timedelta64(6, "h"))
    assert check_chunks(path) == 3
    chunk_dir = path / "data" / "c"
    (chunk_dir / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(DataError) as err:
        check_chunks(path)
    assert "1 of 3 chunks missing (times 2..3 (2021-03-01T12:00:00))" in _one_line(err)
    (chunk_dir / "2" / "0" / "0" / "0").write_bytes(b"not zstd at all")
    with pytest.raises(DataError) as err:
        check_chunks(path, 4, 5)
    assert "1 unreadable (times 4..5 (2021-03-02T00:00:00)" in _one_line(err)


def test_build_dataset_checks_only_the_split(tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from squall.data.setup import build_dataset, ensure_dataset

    conf = str(Path(__file__).resolve().parents[2] / "conf")
    overrides = [f"paths.cache={tmp_path}", "graph.name=o8_l2", "graph.nodes.data.grid=O8",
                 "data.generator.num_times=60", "data.train.start=0", "data.train.end=39",
                 "data.validation.start=40", "data.validation.end=59"]  # fmt: skip
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    path = ensure_dataset(cfg)
    (path / "data" / "45.0.0.0").unlink()  # a validation time (40..59)
    assert len(build_dataset(cfg, "train")) > 0
    with pytest.raises(DataError) as err:
        build_dataset(cfg, "validation")
    assert "time 45 (" in _one_line(err) and str(path) in str(err.value)


def test_worker_error_is_one_line(copy):
    ds = WindowDataset(copy, ["msl", "2t"], input_steps=1, rollout=1)
    (copy / "data" / "2.0.0.0").write_bytes(b"\x00garbage")  # damaged after the check
    loader = make_dataloader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as err:
        for _ in loader:
            pass
    msg = _one_line(err)
    assert str(copy) in msg and "may be corrupt" in msg and "Traceback" not in msg


def test_worker_message_keeps_plain_messages():
    assert worker_message(DataError("dataset x: bad")) == "dataset x: bad"
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File ...\nsquall.errors.DataError: dataset "
                        "x: times 1..2 failed: y")  # fmt: skip
    assert worker_message(wrapped) == "dataset x: times 1..2 failed: y"



def test_store_api_path_agrees_with_plain_files(copy):
    """Stores other than local directories (object stores) are probed through zarr's store API:
    the same sizes, headers and missing keys as the plain-file path."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import LocalStore, MemoryStore

    from squall.data.zarr_dataset import _read_heads

    (copy / "data" / "4.0.0.0").unlink()
    raw = (copy / "data" / "6.0.0.0").read_bytes()
    (copy / "data" / "6.0.0.0").write_bytes(raw[:100])
    keys = [f"data/{t}.0.0.0" for t in range(10)]
    local = _read_heads(LocalStore(str(copy)), keys)
    buffer = default_buffer_prototype().buffer
    memory = MemoryStore({k: buffer.from_bytes((copy / k).read_bytes())
                          for k in keys if (copy / k).exists()})  # fmt: skip
    assert _read_heads(memory, keys) == local
    assert local[4] is None and local[6] == (100, raw[:16])
