"""Synthetic observations: a different number of points at different places every time step.

For each dataset time ``t`` the observations are drawn from a generator seeded by
``(seed, t)``, so a time's observations are the same whichever window, rollout step, worker or
rank reads them, and a different ``seed`` gives another realisation:

* count: uniform integer in ``[count_min, count_max]`` (``0`` to ``10^5`` or more);
* places: uniform on the sphere (latitude ``asin(2u - 1)``, longitude ``2 pi v``);
* values: each channel (a dataset variable, in normalised units) interpolated from the dataset's
  grid at time ``t`` by inverse squared distance over the ``neighbours`` nearest grid points
  (exact :func:`squall.graphs.search.knn`; a point on a grid point takes its value), plus
  independent Gaussian noise of standard deviation ``noise`` (normalised units: for mean-std
  variables, a fraction of the variable's standard deviation);
* missing channels: each (observation, channel) is missing with probability ``missing``; missing
  values are NaN in ``values`` and ``False`` in ``mask``. An observation may miss every channel
  (its place still reaches the model).

A sample of :class:`ObservationWindows` holds ``obs``: one ``(latlon, values, mask)`` triple per
model step of the window, taken at the time of the state that step starts from (the last input
time, then each target time but the last: a rollout step from a predicted state sees the
observations of that state's time). Batches pack them (:func:`collate`) into one
:class:`ObsBatch` per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.utils.data import default_collate

from squall.config import to_container
from squall.data.zarr_dataset import WindowDataset
from squall.errors import DataError
from squall.graphs.search import SphereIndex, knn


@dataclass(frozen=True)
class ObservationSettings:
    """How observations are drawn (``data.observations``; module docstring).

    Attributes
    ----------
    channels : tuple of str
        Dataset variables observed, in the model's channel order.
    count_min, count_max : int
        Observations per time step, inclusive.
    noise : float
        Observation error standard deviation (normalised units).
    missing : float
        Probability that a channel is missing at an observation, in ``[0, 1]``.
    neighbours : int
        Grid points of the inverse-distance interpolation.
    seed : int
        Seed of the whole set of observations.
    """

    channels: tuple[str, ...]
    count_min: int = 0
    count_max: int = 1000
    noise: float = 0.1
    missing: float = 0.2
    neighbours: int = 3
    seed: int = 0

    def __post_init__(self):
        if not self.channels:
            raise DataError("data.observations.channels: name at least one observed variable")
        if not 0 <= self.count_min <= self.count_max:
            raise DataError(f"data.observations.count=[{self.count_min}, {self.count_max}]: need "
                            "0 <= min <= max")  # fmt: skip
        if not self.noise >= 0 or not 0 <= self.missing <= 1 or self.neighbours < 1:
            raise DataError(
                f"data.observations: noise={self.noise} must be >= 0, missing="
                f"{self.missing} within [0, 1], neighbours={self.neighbours} >= 1"
            )

    @classmethod
    def from_cfg(cls, cfg) -> ObservationSettings:
        """From ``cfg.data.observations`` (``count: [min, max]``)."""
        d = dict(to_container(cfg) or {})
        count = d.pop("count", None)
        if count is not None:
            count = list(count)
            if len(count) != 2:
                raise DataError(f"data.observations.count={count}: give [min, max]")
            d["count_min"], d["count_max"] = int(count[0]), int(count[1])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"data.observations has unknown keys {unknown}")
        d["channels"] = tuple(d.get("channels") or ())
        return cls(**d)


def random_places(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 2]`` float64 latitude, longitude (radians, longitude in ``[0, 2 pi)``), uniform on the
    sphere."""
    lat = np.arcsin(np.clip(2 * rng.random(n) - 1, -1.0, 1.0))
    lon = np.minimum(2 * math.pi * rng.random(n), np.nextafter(2 * math.pi, 0))
    return np.stack([lat, lon], 1)


class ObservationSampler:
    """Draws the observations of a dataset time from that time's grid fields.

    Parameters
    ----------
    settings : ObservationSettings
    grid_latlon : np.ndarray
        ``[G, 2]`` radians: the dataset's whole grid (observations never depend on a rank's rows).
    """

    def __init__(self, settings: ObservationSettings, grid_latlon: np.ndarray):
        self.settings = settings
        self.grid_latlon = np.asarray(grid_latlon, dtype=np.float64)
        if settings.neighbours > len(self.grid_latlon):
            raise DataError(f"data.observations.neighbours={settings.neighbours} exceeds the "
                            f"{len(self.grid_latlon)} grid points")  # fmt: skip
        self._index = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index"] = None  # rebuilt in each worker
        return state

    def index(self) -> SphereIndex:
        if self._index is None:
            self._index = SphereIndex.build(self.grid_latlon, "cpu")
        return self._index

    def draw(self, time_index: int, fields: np.ndarray):
        """Observations of dataset time ``time_index`` from ``fields [G, channels]`` (normalised).

        Returns
        -------
        latlon : torch.Tensor
            ``[n, 2]`` float64 radians.
        values : torch.Tensor
            ``[n, channels]`` float32 normalised values, NaN where missing.
        mask : torch.Tensor
            ``[n, channels]`` bool, True where observed.
        """
        s = self.settings
        if fields.shape != (len(self.grid_latlon), len(s.channels)):
            raise DataError(f"observations: fields of shape {fields.shape}, expected "
                            f"{(len(self.grid_latlon), len(s.channels))}")  # fmt: skip
        rng = np.random.default_rng([int(s.seed), int(time_index)])
        n = int(rng.integers(s.count_min, s.count_max + 1))
        latlon = random_places(rng, n)
        values = np.zeros((n, len(s.channels)), dtype=np.float32)
        if n:
            idx, d2 = knn(self.index(), latlon, s.neighbours)
            idx, d2 = idx.numpy(), d2.numpy()
            # inverse squared distance; a point on a grid point takes that point's value
            exact = d2[:, :1] == 0
            w = np.where(exact, (d2 == 0).astype(np.float64), 1.0 / np.maximum(d2, 1e-300))
            w /= w.sum(1, keepdims=True)
            values = np.einsum("nk,nkc->nc", w, fields[idx].astype(np.float64)).astype(np.float32)
        values += (s.noise * rng.standard_normal(values.shape)).astype(np.float32)
        mask = rng.random(values.shape) >= s.missing
        values[~mask] = np.nan
        return torch.from_numpy(latlon), torch.from_numpy(values), torch.from_numpy(mask)


@dataclass
class ObsBatch:
    """Observations of a batch packed into one array (one model step).

    Attributes
    ----------
    latlon : torch.Tensor
        ``[N, 2]`` float64 radians of every observation of every sample.
    values : torch.Tensor
        ``[N, C]`` float32 normalised values (NaN or anything where ``mask`` is False).
    mask : torch.Tensor
        ``[N, C]`` bool, True where observed.
    offsets : torch.Tensor
        ``[B + 1]`` int64 (on the host): sample ``b`` holds rows ``offsets[b]:offsets[b + 1]``.
    """

    latlon: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def pack(cls, parts) -> ObsBatch:
        """Pack ``[(latlon, values, mask), ...]``, one per sample, in batch order."""
        parts = list(parts)
        if not parts:
            raise DataError("observations: nothing to pack (empty batch)")
        counts = torch.tensor([len(p[0]) for p in parts], dtype=torch.int64)
        offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        return cls(*(torch.cat([p[i] for p in parts]) for i in range(3)), offsets)

    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``(latlon, values, mask)`` of sample ``b``."""
        lo, hi = int(self.offsets[b]), int(self.offsets[b + 1])
        return self.latlon[lo:hi], self.values[lo:hi], self.mask[lo:hi]

    def to(self, device, non_blocking: bool = False) -> ObsBatch:
        """Arrays on ``device``; ``offsets`` stay on the host (the graph builder reads them)."""
        move = {"device": device, "non_blocking": non_blocking}
        return ObsBatch(self.latlon.to(**move), self.values.to(**move), self.mask.to(**move),
                        self.offsets)  # fmt: skip

    def pin_memory(self) -> ObsBatch:
        return ObsBatch(self.latlon.pin_memory(), self.values.pin_memory(),
                        self.mask.pin_memory(), self.offsets)  # fmt: skip


def collate(samples: list[dict]) -> dict:
    """Default collation of every key but ``obs``, whose per-step lists become one
    :class:`ObsBatch` per step."""
    rest = default_collate([{k: v for k, v in s.items() if k != "obs"} for s in samples])
    if "obs" in samples[0]:
        steps = len(samples[0]["obs"])
        rest["obs"] = [ObsBatch.pack(s["obs"][r] for s in samples) for r in range(steps)]
    return rest


class ObservationWindows(WindowDataset):
    """:class:`WindowDataset` whose samples also hold ``obs`` (module docstring).

    Parameters
    ----------
    observations : ObservationSettings
    *args, **kwargs
        As for :class:`WindowDataset`; ``observations.channels`` must be among its variables.
    """

    #: DataLoaders built by :func:`squall.data.zarr_dataset.make_dataloader` collate with this
    collate_fn = staticmethod(collate)

    def __init__(self, *args, observations: ObservationSettings, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [c for c in observations.channels if c not in self.variables]
        if missing:
            raise DataError(f"data.observations.channels {missing} are not among the dataset "
                            f"variables {list(self.variables)}")  # fmt: skip
        self.obs_columns = np.array([self.variables.index(c) for c in observations.channels])
        lat = np.asarray(self.info.latitudes, dtype=np.float64)
        lon = np.remainder(np.asarray(self.info.longitudes, dtype=np.float64), 360.0)
        self.sampler = ObservationSampler(observations, np.deg2rad(np.stack([lat, lon], 1)))

    @property
    def observation_settings(self) -> ObservationSettings:
        return self.sampler.settings

    def observation_times(self, k: int) -> np.ndarray:
        """Dataset times of the observations of sample ``k``, one per model step."""
        times = self.window_times(k)
        n = self.input_steps
        return times[n - 1 : n - 1 + max(1, self.rollout)]

    def _fields(self, times: np.ndarray, sample: dict) -> np.ndarray:
        """Whole-grid normalised fields ``[steps, G, channels]`` of the observed channels."""
        cols = self.obs_columns
        if self.grid_indices is None:  # the sample already holds them
            states = torch.cat([sample["x"][-1:], sample["y"]])[: len(times)]
            return states[..., cols].numpy()
        # a rank's sample holds its own rows: read the whole grid of the observed channels
        stride = int(times[1] - times[0]) if len(times) > 1 else 1
        block = self._array()[int(times[0]) : int(times[-1]) + 1 : stride, :, self.member]
        block = block[:, self.var_index[cols]].transpose(0, 2, 1).astype(np.float32)
        return (block - self._offset[cols]) / self._scale[cols]

    def __getitem__(self, k: int) -> dict:
        sample = super().__getitem__(k)
        times = self.observation_times(k)
        fields = self._fields(times, sample)
        sample["obs"] = [self.sampler.draw(int(t), f) for t, f in zip(times, fields, strict=True)]
        return sample
