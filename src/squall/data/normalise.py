"""Per-variable normalisation and area weights."""

from __future__ import annotations

import numpy as np
import torch

from squall.errors import DataError

METHODS = ("mean-std", "std", "min-max", "max", "none")
# A variable whose spread is below this fraction of its magnitude (or exactly zero) is constant
# over the dataset (land-sea mask, orography in time, ...): it is only shifted, never divided by
# a near-zero spread. 1e-6 is ~10 float32 ulps, below any real variability.
CONSTANT_RTOL = 1e-6


class Normaliser(torch.nn.Module):
    """``normalise(x) = (x - offset) / scale`` over the last (variable) dimension.

    Buffers ``offset`` and ``scale`` (float32 ``[variable]``) move with the module and are saved
    in its state dict, so a checkpoint carries the normalisation it was trained with.
    """

    def __init__(self, variables, offset, scale):
        super().__init__()
        self.variables = tuple(variables)
        self.register_buffer("offset", torch.as_tensor(np.asarray(offset), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=torch.float32))

    @classmethod
    def from_statistics(cls, variables, statistics: dict, methods: dict | None = None):
        """Build from dataset statistics.

        Parameters
        ----------
        variables : sequence of str
        statistics : dict
            ``mean``, ``stdev``, ``minimum``, ``maximum``, each ``[variable]`` in ``variables``
            order.
        methods : dict, optional
            ``{"default": "mean-std", "min-max": [names], "none": [names], ...}``: ``mean-std``
            maps to zero mean and unit variance; ``std`` divides by the stdev only (skewed
            positive fields such as precipitation keep 0 at 0); ``min-max`` maps to [0, 1];
            ``max`` divides by the maximum (orography); ``none`` leaves values as they are (for
            forcings already in [-1, 1]).
        """
        methods = dict(methods or {})
        default = methods.pop("default", "mean-std")
        per_var = {v: default for v in variables}
        for method, names in methods.items():
            if method not in METHODS:
                raise DataError(f"normalisation method {method!r} unknown; choose from {METHODS}")
            for name in names or ():
                if name in per_var:
                    per_var[name] = method
        if default not in METHODS:
            raise DataError(f"normalisation default {default!r} unknown; choose from {METHODS}")
        mean, std = np.asarray(statistics["mean"]), np.asarray(statistics["stdev"])
        lo, hi = np.asarray(statistics["minimum"]), np.asarray(statistics["maximum"])
        offset, scale = np.zeros(len(per_var)), np.ones(len(per_var))
        for i, name in enumerate(variables):
            method = per_var[name]
            if method == "mean-std":
                offset[i], scale[i] = mean[i], std[i]
            elif method == "std":
                scale[i] = std[i]
            elif method == "min-max":
                offset[i], scale[i] = lo[i], hi[i] - lo[i]
            elif method == "max":
                scale[i] = hi[i]
            tiny = CONSTANT_RTOL * max(abs(mean[i]), abs(lo[i]), abs(hi[i]), 1.0)
            if method != "none" and not scale[i] > tiny:
                scale[i] = 1.0
        return cls(variables, offset, scale)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset.to(x.dtype)) / self.scale.to(x.dtype)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.offset.to(x.dtype)

    def subset(self, names) -> Normaliser:
        """The normaliser of ``names`` only (e.g. the prognostic outputs)."""
        idx = [self.variables.index(n) for n in names]
        return Normaliser(names, self.offset[idx], self.scale[idx])

    def extra_repr(self) -> str:
        return f"variables={len(self.variables)}"


def area_weights_from_latitudes(latitudes_deg: np.ndarray) -> np.ndarray:
    """Area weight of each point of a row-structured grid, normalised to mean 1.

    Points sharing a latitude form a row; each row owns the band between the midpoints to its
    neighbouring rows (out to the poles) and shares its area among its points. Exact for regular
    and reduced Gaussian grids; a rough density estimate for unstructured points.
    """
    lat = np.asarray(latitudes_deg, dtype=np.float64)
    rows, inverse, counts = np.unique(np.round(lat, 6), return_inverse=True, return_counts=True)
    edges = np.concatenate([[-90.0], 0.5 * (rows[1:] + rows[:-1]), [90.0]])
    band = np.diff(np.sin(np.radians(edges)))
    weights = (band / counts)[inverse]
    return weights / weights.mean()
