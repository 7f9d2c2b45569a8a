import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from squall.errors import ConfigError, GraphCacheError, GraphError
from squall.graphs import build_graph, load_graph, load_or_build
from squall.graphs.store import cache_path

ROOT = Path(__file__).resolve().parents[2]


def spec(name="o32_l4"):
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "graph" / f"{name}.yaml"))


@pytest.fixture(scope="module")
def small():
    return build_graph(spec())


def test_counts_and_reach(small):
    assert len(small.nodes["data"]) == 4 * 32 * 41
    assert len(small.nodes["hidden"]) == 10 * 4**4 + 2
    assert small.edges["processor"].num_edges == 60 * (4**5 - 1) // 3
    assert small.edges["decoder"].num_edges == 3 * len(small.nodes["data"])
    for e in small.edges.values():
        assert e.in_degree().min() >= 1, f"{e.name}: every destination reached"


def test_csc_and_csr_consistent(small):
    for e in small.edges.values():
        assert e.colptr[0] == 0 and e.colptr[-1] == e.num_edges
        dst = e.dst_index
        assert np.all(np.diff(dst) >= 0), "CSC: sorted by destination"
        assert np.all((np.diff(e.row) > 0) | (np.diff(dst) > 0)), "then by source, no duplicates"
        assert np.array_equal(np.sort(e.csr_perm), np.arange(e.num_edges))
        src_sorted = e.row[e.csr_perm]
        assert np.all(np.diff(src_sorted) >= 0)
        assert np.array_equal(np.diff(e.rowptr), np.bincount(e.row, minlength=e.num_src))
        for s in (0, e.num_src // 2, e.num_src - 1):
            ids = e.csr_perm[e.rowptr[s] : e.rowptr[s + 1]]
            assert np.all(e.row[ids] == s) and np.all(np.diff(ids) > 0)


def test_save_load_roundtrip(small, tmp_path):
    from squall.graphs import save_graph

    path = save_graph(small, tmp_path / "g.npz")
    back = load_graph(path, small.spec_hash)
    assert back.statistics()["edges"] == small.statistics()["edges"]
    for name, e in small.edges.items():
        for f in ("colptr", "row", "rowptr", "csr_perm", "attrs"):
            assert np.array_equal(getattr(e, f), getattr(back.edges[name], f))
    assert np.array_equal(back.nodes["hidden"].mesh_levels, small.nodes["hidden"].mesh_levels)


def test_cache_hit_miss_and_rebuild(tmp_path):
    s = spec()
    first = load_or_build(s, tmp_path)
    path = cache_path(s, tmp_path)
    assert path.exists() and "loaded_from" not in first.meta
    second = load_or_build(s, tmp_path)
    assert second.meta["loaded_from"] == str(path)
    s2 = spec()
    s2["edges"]["decoder"]["k"] = 4
    assert cache_path(s2, tmp_path) != path
    third = load_or_build(s2, tmp_path)
    assert third.edges["decoder"].num_edges == 4 * 5248
    rebuilt = load_or_build({**s, "rebuild": True}, tmp_path)
    assert "loaded_from" not in rebuilt.meta
    with pytest.raises(ConfigError, match="graph.rebuild='maybe': use true or false"):
        load_or_build({**s, "rebuild": "maybe"}, tmp_path)


def test_corrupt_and_stale_cache(tmp_path):
    s = spec()
    load_or_build(s, tmp_path)
    path = cache_path(s, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])
    with pytest.raises(GraphCacheError, match="is corrupt.*delete .* or rebuild"):
        load_or_build(s, tmp_path)
    path.write_bytes(good)
    with pytest.raises(GraphCacheError, match="is stale"):
        load_graph(path, expected_hash="0" * 16)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["nodes"]["data"].update(grid="Q96"), "unknown grid"),
        (lambda s: s["nodes"]["hidden"].update(level=-2), "non-negative"),
        (lambda s: s["edges"]["decoder"].update(k=10**6), "k=1000000"),
        (lambda s: s["edges"]["encoder"].update(factor=0.1), "without edges"),
        (lambda s: s["edges"]["encoder"].update(src="grid"), "not a node set"),
        (lambda s: s["nodes"]["data"].update(type="hexagons"), "unknown type 'hexagons'"),
    ],
)
def test_bad_specs(mutate, message):
    s = spec()
    mutate(s)
    with pytest.raises(GraphError, match=message):
        build_graph(s)


@pytest.mark.parametrize("name", ["stretched_nordic", "lam_alps"])
def test_regional_specs_build(name):
    g = build_graph(spec(name))
    for e in g.edges.values():
        assert e.in_degree().min() >= 1
        assert np.isfinite(e.attrs).all()
    if name == "stretched_nordic":
        data = g.nodes["data"]
        assert 0 < data.meta["num_fine"] < len(data)
        hidden = g.nodes["hidden"].mesh_levels
        assert (hidden == 7).any() and (hidden <= 5).sum() == 10 * 4**5 + 2


def run_job(*args, cache):
    env = {"SQUALL_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    if "PYTHONPATH" in os.environ:  # where the dependencies live outside the interpreter's own
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-m", "jobs.graph", *args, "hydra.run.dir=" + str(cache / "hydra")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_graph_job_prints_table_and_json(tmp_path):
    out = run_job(cache=tmp_path)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["nodes"] == {"data": 5248, "hidden": 2562}
    assert stats["source"] == "built"
    assert "edge set" in out.stdout and "deg mean" in out.stdout
    again = json.loads(run_job(cache=tmp_path).stdout.strip().splitlines()[-1])
    assert again["source"] == "loaded from cache"


def test_graph_job_bad_input_is_one_line(tmp_path):
    out = run_job("graph.edges.decoder.k=0", cache=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: knn edges") and "Traceback" not in out.stderr
