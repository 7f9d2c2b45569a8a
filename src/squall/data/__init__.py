"""Datasets: anemoi-like zarr stores, a synthetic generator, windows for training, normalisation.

See :mod:`squall.data.zarr_dataset` for the on-disk layout and :mod:`squall.data.synthetic` for
the generated fields.
"""

from squall.data.normalise import Normaliser, area_weights_from_latitudes
from squall.data.sampler import ResumableSampler
from squall.data.setup import build_dataset, data_nodes, ensure_dataset, variable_roles
from squall.data.synthetic import SyntheticSettings, generate
from squall.data.zarr_dataset import (
    DatasetInfo,
    DatasetWriter,
    WindowDataset,
    make_dataloader,
    read_info,
)

__all__ = [
    "DatasetInfo",
    "DatasetWriter",
    "Normaliser",
    "ResumableSampler",
    "SyntheticSettings",
    "WindowDataset",
    "area_weights_from_latitudes",
    "build_dataset",
    "data_nodes",
    "ensure_dataset",
    "generate",
    "make_dataloader",
    "read_info",
    "variable_roles",
]
