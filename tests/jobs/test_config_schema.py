"""Settings checked by squall.schema: one ``error:`` line and exit 2 for a wrong type, a value out
of range or an unknown key, in every job, before any work; outputs under the cache; ``--cfg``
with ``--multirun``; rank-0 logging under launchers."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from squall import schema
from squall.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))  # jobs/ is a directory of the repository, not an installed package

from jobs import _entry  # noqa: E402

# CPU seconds of a job that stops at its settings: interpreter, torch/mlflow imports and Hydra's
# composition, 4.5 s for jobs.train (1.7 s for jobs.graph) on this 2-core machine; generating the
# default dataset and training take over 30 s. CPU time, not wall time: the bound holds on a
# loaded machine too.
SETTLED_CPU_S = 15.0

# The bad settings of the issue, and what the one line must say.
BAD_TRAINING = [
    ("training.max_steps=abc", "training.max_steps: Value 'abc' of type 'str' could not be "
                               "converted to Integer"),
    ("training.lr=abc", "training.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("training.batch_size=0", "training.batch_size=0: must be >= 1"),
    ("training.rollout=0", "training.rollout=0: must be >= 1"),
    ("training.max_steps=0", "training.max_steps=0: must be >= 1"),
    ("training.max_steps=-5", "training.max_steps=-5: must be >= 1"),
    ("training.max_step=5", "training.max_step is not a setting; training settings: "
                            "batch_size, checkpoint_every,"),
    ("+training.max_step=5", "training.max_step is not a setting; training settings:"),
]  # fmt: skip


def _env(cache: Path) -> dict:
    env = dict(os.environ, SQUALL_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_job(job: str, args: list[str], cwd: Path, cache: Path, timeout: float = 180):
    """``python -m jobs.JOB ARGS`` in ``cwd``; the result and the CPU seconds it used."""
    start = _cpu_of_children()
    done = subprocess.run([sys.executable, "-m", f"jobs.{job}", *args], cwd=cwd, env=_env(cache),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done, _cpu_of_children() - start


def _one_error_line(done) -> str:
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    """One Hydra initialisation for the module's compositions (each one alone: ~0.1 s)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(*overrides: str, config: str = "config"):
    return compose(config, overrides=list(overrides))


def _message(*overrides: str, config: str = "config") -> str | None:
    """The one line a job prints for these overrides (None: they are fine), as jobs._entry
    makes it: Hydra's composition errors through describe_config_error, then validate."""
    try:
        cfg = _compose(*overrides, config=config)
    except Exception as err:  # noqa: BLE001 - any composition error must become one line
        assert _entry._is_config_error(err), repr(err)
        return _entry.describe_config_error(err)
    try:
        schema.validate(cfg)
    except ConfigError as err:
        return str(err)
    return None


# ----------------------------------------------------------------------------------------------
# every shipped config is valid


GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("graph", "model", "training", "tracking", "forecast", "parallel")
}


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUP_OPTIONS.items()
                                           for o in opts])  # fmt: skip
def test_every_shipped_option_passes_the_schema(group, option):
    assert _message(f"{group}={option}") is None


def test_real_data_config_passes_the_schema():
    assert _message("data=zarr", "data.path=/data/era5.zarr") is None


@pytest.mark.parametrize("cluster", sorted(p.stem for p in (CONF / "cluster").glob("*.yaml")))
def test_every_cluster_passes_the_schema(cluster):
    # training.run_dir of a point lies in Hydra's job folder, known only once a job runs.
    assert _message(f"cluster={cluster}", "training.run_dir=/runs/x", config="scale") is None


def test_every_setting_is_documented():
    """Each schema field appears in its dataclass's docstring (the settings reference)."""
    undocumented = []
    schemas = [obj for obj in vars(schema).values()
               if dataclasses.is_dataclass(obj) and obj is not schema.SquallSchema]  # fmt: skip
    assert len(schemas) >= 13
    for cls in schemas:
        for f in dataclasses.fields(cls):
            if not re.search(rf"^ +(\w+, )*{f.name}(, \w+)* : ", cls.__doc__, re.MULTILINE):
                undocumented.append(f"{cls.__name__}.{f.name}")
    assert not undocumented


# ----------------------------------------------------------------------------------------------
# bad settings, in-process (the same path as the jobs take)


@pytest.mark.parametrize("override, wanted", BAD_TRAINING)
def test_bad_training_settings(override, wanted):
    message = _message(override)
    assert message is not None and message.startswith(wanted)
    assert "\n" not in message


@pytest.mark.parametrize("overrides, wanted", [
    (["model.num_heads=3"], "model.num_channels=32 is not a multiple of model.num_heads=3"),
    (["model.checkpoint.processor=[none,mlp,full]"],
     "model.checkpoint.processor lists 3 policies for model.processor_layers=2"),
    (["model.checkpoint.encoder=some"], "model.checkpoint.encoder: 'some' is not one of none, "
                                        "mlp, full, or true/false"),
    (["model.compile=maybe"], "model.compile: Value 'maybe' is not a valid bool"),
    (["model.attention_backend=cuda"], "model.attention_backend='cuda': choose one of torch, "
                                       "triton"),
    (["training.device=gpu"], "training.device='gpu': choose auto, cpu, cuda or cuda:N"),
    (["training.min_lr_ratio=2"], "training.min_lr_ratio=2.0: must be <= 1"),
    (["training.precision=fp16"], "training.precision='fp16': choose one of auto, fp32, bf16"),
    (["data.generator.lifetime_days=[3]"], "data.generator.lifetime_days=[3.0]: give "
                                           "[shortest, longest]"),
    (["data.num_workers=-1"], "data.num_workers=-1: must be >= 0"),
    (["data.generator.wind=3"], "data.generator.wind is not a setting; data.generator "
                                "settings: block,"),
    (["graph.edges.decoder.src=mesh"], "graph.edges.decoder.src='mesh': choose one of the node "
                                       "sets data, hidden"),
    (["graph.nodes.data.gridd=O8"], "graph.nodes.data.gridd is not a setting; graph.nodes.data "
                                    "settings: grid, type"),
    (["forecast.steps=0"], "forecast.steps=0: must be >= 1"),
    (["forecast.split=future"], "forecast.split='future': choose one of train, validation, test"),
    (["parallel.partition=hexagons"], "parallel.partition='hexagons': choose one of sfc, ranges, bands, work"),
    (["parallel.gpus=two"], "parallel.gpus: Value 'two' of type 'str' could not be converted"),
    (["tracking.enabled=perhaps"], "tracking.enabled: Value 'perhaps' is not a valid bool"),
    (["+foo=1"], "foo is not a setting; top-level groups: cluster, data, forecast, graph,"),
    (["scale.batch=3"], "scale.batch does not apply here: this job's config has no scale "
                        "settings"),
    (["graph=o48_l5"], "In 'config': Could not find 'graph/o48_l5'; Available options in "
                       "'graph': lam_alps, o1280_l8, o320_l7, o32_l4, o96_l6, stretched_nordic"),
    (["training.max_steps=[1"], "no viable alternative at input '[1'"),
])  # fmt: skip
def test_bad_settings_of_every_group(overrides, wanted):
    message = _message(*overrides)
    assert message is not None and message.startswith(wanted), message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, wanted", [
    (["scale.batch=0"], "scale.batch=0: must be >= 1"),
    (["scale.steps=many"], "scale.steps: Value 'many' of type 'str' could not be converted"),
    (["scale.mode=sideways"], "scale.mode='sideways': choose one of strong, weak"),
    (["scale.stepz=3"], "scale.stepz is not a setting; scale settings: batch,"),
    (["cluster.gpus_per_node=0"], "cluster.gpus_per_node=0: must be >= 1"),
    (["cluster=h100", "cluster.backend=mpi"], "cluster.backend='mpi': choose one of gloo, nccl"),
])  # fmt: skip
def test_bad_scale_and_cluster_settings(overrides, wanted):
    message = _message(*overrides, "training.run_dir=/runs/x", config="scale")
    assert message is not None and message.startswith(wanted), message


def test_missing_value_names_the_key():
    cfg = _compose()
    cfg.training.run_dir = "???"
    with pytest.raises(ConfigError, match=r"^training.run_dir has no value \(\?\?\? in the "):
        schema.validate(cfg)


def test_open_groups_leave_undeclared_keys_to_their_readers():
    cfg = _compose("training.run_dir=/runs/x", config="scale")
    with open_dict(cfg):  # a key a cluster helper reads (squall.scaling.batch)
        cfg.cluster.srun_args = ["--cpu-bind=cores"]
    schema.validate(cfg)
    cfg.cluster.max_nodes = 0
    with pytest.raises(ConfigError, match="cluster.max_nodes=0: must be >= 1"):
        schema.validate(cfg)


# ----------------------------------------------------------------------------------------------
# real jobs


def test_train_stops_at_a_bad_setting_in_one_line(tmp_path):
    """A real `python -m jobs.train` for an error Hydra finds while composing (a type) and one
    squall's check finds (a range): one line, exit 2, no work done, nothing written in the
    working directory or the cache. (Unknown keys take the type's path: the tests above.)"""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    for override, wanted in (BAD_TRAINING[0], BAD_TRAINING[4]):
        done, seconds = _run_job("train", [override], cwd, cache)
        assert _one_error_line(done).startswith(f"error: {wanted}")
        assert seconds < SETTLED_CPU_S
    assert not any(cwd.iterdir())
    assert not (cache / "datasets").exists() and not (cache / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("job, override, wanted", [
    ("graph", "graph.rebuild=sometimes", "graph.rebuild: Value 'sometimes' is not a valid bool"),
    ("make_dataset", "data.generator.num_times=0", "data.generator.num_times=0: must be >= 1"),
    ("dry_run", "parallel.model_parallel=0", "parallel.model_parallel=0: must be >= 1"),
    ("forecast", "forecast.max_starts=abc", "forecast.max_starts: Value 'abc' of type 'str'"),
    ("scale", "scale.batch=0", "scale.batch=0: must be >= 1"),
    ("scale", "cluster=h300", "In 'scale': Could not find 'cluster/h300'; Available options"),
])  # fmt: skip
def test_every_job_stops_at_a_bad_setting_in_one_line(tmp_path, job, override, wanted):
    done, seconds = _run_job(job, [override], tmp_path, tmp_path / "cache")
    assert _one_error_line(done).startswith(f"error: {wanted}")
    assert seconds < SETTLED_CPU_S
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"])


@pytest.mark.slow
def test_a_sweep_stops_at_a_shared_bad_setting_before_any_point(tmp_path):
    """A setting every point shares is checked once in the driver: one line, exit 2, no sweep
    folder, no point submitted."""
    done, seconds = _run_job("scale", ["--multirun", "scale.batch=0"], tmp_path,
                             tmp_path / "cache")  # fmt: skip
    assert _one_error_line(done) == "error: scale.batch=0: must be >= 1"
    assert seconds < SETTLED_CPU_S
    assert not (tmp_path / "cache" / "sweeps").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["cache"])


def test_a_job_writes_under_the_cache_only(tmp_path):
    """jobs.graph in an empty working directory: its Hydra folder and log go to
    <cache>/jobs/graph/<date>_<time>_<launch id>/, the graph to <cache>/graphs/."""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    done, _ = _run_job("graph", ["graph.name=o8_l2", "graph.nodes.data.grid=O8",
                                 "graph.nodes.hidden.level=2"], cwd, cache)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(cwd.iterdir())
    [folder] = (cache / "jobs" / "graph").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_p\d+", folder.name)
    assert (folder / ".hydra" / "config.yaml").is_file()
    assert "graph o8_l2: built" in (folder / "graph.log").read_text()
    assert sorted(p.name for p in cache.iterdir()) == ["graphs", "jobs"]


def test_cfg_job_prints_the_config(tmp_path):
    """`--cfg job`, with and without --multirun, prints the config as YAML and exits 0."""
    done, _ = _run_job("scale", ["--multirun", "--cfg", "job"], tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    cfg = OmegaConf.create(done.stdout)
    assert cfg.scale.batch == 2 and cfg.parallel.gpus == 1 and cfg.cluster.name == "local"
    assert "--cfg with --multirun: one job of the sweep" in done.stderr
    # A swept key shows its first value.
    done, _ = _run_job("graph", ["--cfg", "job", "-m", "graph=o96_l6,o32_l4", "graph.rebuild=true"],
                       tmp_path, tmp_path / "cache")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = OmegaConf.create(done.stdout)
    assert cfg.graph.name == "o96_l6" and cfg.graph.rebuild is True
    assert "first value of graph" in done.stderr
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# logging under launchers


@pytest.fixture
def root_logging():
    """The root logger with one handler writing to a buffer; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield buffer
    # setup_logging filters every root handler, pytest's own log capture among them (added for
    # the test's call): take those filters off, or later tests capture no INFO record
    for handler in {*root.handlers, *saved[0]}:
        for rank_filter in [f for f in handler.filters if isinstance(f, _entry.RankFilter)]:
            handler.removeFilter(rank_filter)
    root.handlers[:], root.level = saved


@pytest.mark.parametrize("env, wanted", [
    ({}, ["INFO step 1 of 8", "WARNING slow disk"]),
    ({"RANK": "0"}, ["INFO step 1 of 8", "WARNING slow disk"]),
    ({"RANK": "3"}, ["WARNING [rank 3] slow disk"]),
    ({"SLURM_PROCID": "1"}, ["WARNING [rank 1] slow disk"]),
])  # fmt: skip
def test_only_the_first_rank_logs_info(monkeypatch, root_logging, env, wanted):
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _entry.setup_logging()
    _entry.setup_logging()  # idempotent: one filter, one prefix
    log = logging.getLogger("squall.test")
    log.info("step %d of %d", 1, 8)
    log.warning("slow disk")
    assert root_logging.getvalue().splitlines() == wanted


@pytest.mark.slow
def test_torchrun_logs_once(tmp_path):
    """Two ranks under torchrun: rank 0's info lines once, not once per rank; both ranks share
    the job folder."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this interpreter")
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    args = [torchrun, "--standalone", "--nproc-per-node=2", "-m", "jobs.graph",
            "graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2"]  # fmt: skip
    done = subprocess.run(args, cwd=cwd, env=_env(cache), capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert len(re.findall(r"graph o8_l2: (built|loading)", out)) == 1, out[-3000:]
    assert out.count('"graph": "o8_l2"') == 2  # each rank still prints its own result
    assert not any(cwd.iterdir())
    folders = list((cache / "jobs" / "graph").iterdir())
    assert len({f.name.rsplit("_", 1)[1] for f in folders}) == 1  # one launch id for both ranks
