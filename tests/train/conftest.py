import pytest
from hydra import compose, initialize_config_dir

from squall.tracking import NullLogger

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "conf")

# O8 grid + level-2 mesh, 60 synthetic times split 40 / 20: a whole run in seconds on 2 cores.
TINY = [
    "graph.name=o8_l2", "graph.nodes.data.grid=O8", "graph.nodes.hidden.level=2",
    "graph.edges.encoder.factor=0.8", "data.generator.num_times=60", "data.num_workers=0",
    "data.train.start=0", "data.train.end=39", "data.validation.start=40", "data.validation.end=59",
    "data.test.start=40", "data.test.end=59", "model.num_channels=16", "model.num_heads=2",
    "training.log_every=1", "training.val_every=5", "training.val_batches=2", "training.warmup_steps=2",
]  # fmt: skip


def tiny_overrides(tmp_path, *extra):
    return [*TINY, f"paths.cache={tmp_path}", *extra]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose("config", overrides=tiny_overrides(tmp_path, *extra))

    return make


class RecordingLogger(NullLogger):
    """Keeps every logged metric; optionally raises a signal at a given step (a 'kill')."""

    def __init__(self, signal_at=None):
        self.metrics, self.signal_at = [], signal_at

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))
        if self.signal_at is not None and step == self.signal_at:
            import signal

            signal.raise_signal(signal.SIGUSR1)


@pytest.fixture(name="tiny_overrides")
def tiny_overrides_fixture():
    return tiny_overrides


@pytest.fixture
def recording_logger():
    return RecordingLogger
