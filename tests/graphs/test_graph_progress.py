"""Graph builds show their progress (node sets, then edge sets, a k-nearest search in blocks of
destinations), and searching in blocks builds exactly the graph that one search builds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from squall.graphs import build_graph
from squall.graphs import edges as edge_module

ROOT = Path(__file__).resolve().parents[2]


def o32_spec() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "graph" / "o32_l4.yaml"))


def test_searching_in_blocks_builds_the_same_graph(monkeypatch):
    whole = build_graph(o32_spec())
    # the decoder's 5,248 grid points in 21 blocks, the last one partial
    monkeypatch.setattr(edge_module, "SEARCH_CHUNK", 250)
    monkeypatch.setattr(edge_module, "DEVICE_SEARCH_CHUNK", 250)  # the same blocks on a GPU
    blocks = build_graph(o32_spec())
    for name, e in whole.edges.items():
        b = blocks.edges[name]
        assert np.array_equal(e.colptr, b.colptr) and np.array_equal(e.row, b.row), name
        assert np.array_equal(e.attrs, b.attrs), name


def test_a_build_shows_its_progress_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("SQUALL_PROGRESS", "1")  # a bar, as on a terminal
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(edge_module, "SEARCH_CHUNK", 1024)
    monkeypatch.setattr(edge_module, "DEVICE_SEARCH_CHUNK", 1024)
    build_graph(o32_spec())
    err = capsys.readouterr().err
    assert "graph o32_l4: node sets: 100%" in err and "2/2" in err
    # encoder (cutoff) and processor: a step each; decoder (knn): 5,248 points in 6 blocks
    assert "graph o32_l4: edge sets: 100%" in err and "8/8" in err


def test_other_ranks_show_nothing(monkeypatch, capsys):
    monkeypatch.setenv("SQUALL_PROGRESS", "1")
    monkeypatch.setenv("RANK", "1")
    build_graph(o32_spec())
    assert capsys.readouterr().err == ""
