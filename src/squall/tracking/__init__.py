"""Run tracking: MLflow behind a small logger interface and a durable local journal, metric
names, run environment."""

from squall.tracking.buffer import sync_tree
from squall.tracking.environment import collect_environment, git_revision
from squall.tracking.logger import (
    MlflowLogger,
    NullLogger,
    RunLogger,
    TrackingError,
    create_logger,
    find_sweep_parent,
    flatten_config,
    local_store_uri,
    prepare_store,
    record_run_end,
    record_run_failure,
    resolve_tracking_uri,
    start_sweep_parent,
)
from squall.tracking.metrics import GpuSampler, StepStats, StepTimer, peak_memory

__all__ = [
    "GpuSampler",
    "MlflowLogger",
    "NullLogger",
    "RunLogger",
    "StepStats",
    "StepTimer",
    "TrackingError",
    "collect_environment",
    "create_logger",
    "find_sweep_parent",
    "flatten_config",
    "git_revision",
    "local_store_uri",
    "peak_memory",
    "prepare_store",
    "record_run_end",
    "record_run_failure",
    "resolve_tracking_uri",
    "start_sweep_parent",
    "sync_tree",
]
