"""The GPU cluster configs: one base (conf/cluster/base/slurm_gpu.yaml), H100 and H200 as
overrides, and what the scaling model reads from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from squall.errors import ConfigError
from squall.planning.scaling import REPO_ROOT, ClusterSpec, load_calibration

CONF = REPO_ROOT / "conf"
# What an H100 or H200 file may set; everything else comes from the base.
OVERRIDES = {"name", "gpu_memory_gb", "rates", "calibration"}


def cluster(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="scale", overrides=[f"cluster={name}"]).cluster


@pytest.fixture(scope="module")
def gpus():
    return {name: OmegaConf.to_container(cluster(name), resolve=True) for name in ("h100", "h200")}


def test_h100_and_h200_differ_only_in_their_overrides(gpus):
    base = yaml.safe_load((CONF / "cluster" / "base" / "slurm_gpu.yaml").read_text())["cluster"]
    for name, cfg in gpus.items():
        own = yaml.safe_load((CONF / "cluster" / f"{name}.yaml").read_text())["cluster"]
        assert set(own) <= OVERRIDES, f"{name}.yaml repeats base keys {set(own) - OVERRIDES}"
        for key in set(base) - OVERRIDES:
            assert (
                cfg[key]
                == OmegaConf.to_container(OmegaConf.create({"cluster": base}), resolve=True)[
                    "cluster"
                ][key]
            ), key
    h100, h200 = gpus["h100"], gpus["h200"]
    assert h100["links"] == h200["links"]
    assert h200["gpu_memory_gb"] > h100["gpu_memory_gb"]
    assert h200["rates"]["hbm_GBps"] > h100["rates"]["hbm_GBps"]


def test_every_link_and_rate_states_its_source():
    for name in ("base/slurm_gpu", "h100", "h200"):
        lines = (CONF / "cluster" / f"{name}.yaml").read_text().splitlines()
        for i, line in enumerate(lines):
            key = line.strip().split(":")[0]
            if key.endswith(("_GBps", "_TFLOPs", "_us")) and "???" not in line:
                assert lines[i - 1].strip().startswith("#") or "#" in line, f"{name}: {key}"


@pytest.mark.parametrize("name", ["h100", "h200"])
def test_the_scaling_model_reads_each_cluster_and_its_calibration(name):
    cfg = cluster(name)
    spec = ClusterSpec.from_cfg(cfg)
    assert spec.gpus_per_node == 8 and spec.network_Bps < spec.nvlink_Bps
    assert spec.memory_gib == pytest.approx(cfg.gpu_memory_gb * 1e9 / 1024**3)
    cal = load_calibration(str(REPO_ROOT / cfg.calibration))
    assert name.upper() in cal.gpu and cal.mcfg.num_channels == 1024
    assert cal.processor_s is not None and cal.processor_s < cal.step_s


def test_a_cluster_without_links_is_one_clear_error():
    cfg = OmegaConf.create({"name": "mine", "gpus_per_node": 4, "rates": {"hbm_GBps": 1000}})
    with pytest.raises(ConfigError, match=r"cluster mine: cluster.links.nvlink_GBps is not set"):
        ClusterSpec.from_cfg(cfg)
    unset = cluster("h100")
    unset.rates.hbm_GBps = None
    with pytest.raises(ConfigError, match="cluster h100: cluster.rates.hbm_GBps is not set"):
        ClusterSpec.from_cfg(unset)
    with pytest.raises(ConfigError, match=r"cluster \?: cluster.name is not set"):
        ClusterSpec.from_cfg(cluster("base/slurm_gpu"))  # the base alone is no cluster


@pytest.mark.slow
def test_dry_run_prints_and_plots_the_projection(tmp_path):
    """jobs.dry_run on a Slurm GPU cluster config (a single, not --multirun, job): estimate,
    strong and weak projections, the chosen layout, the plot."""
    plot = tmp_path / "scaling.png"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.dry_run", "--config-name", "scale", "cluster=h200",
         "graph=o32_l4", "model=o96", "parallel.gpus=4", f"paths.cache={tmp_path}",
         "+scale.projection_gpus=[1,2,4,8,16]", f"+scale.projection_plot={plot}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "strong scaling, global batch 32" in out and "weak scaling" in out
    assert "chosen for parallel.gpus=4 (strong scaling): dp" in out
    assert Path(plot).stat().st_size > 10_000
