"""From the Hydra config to a dataset on disk and the torch datasets of each split."""

from __future__ import annotations

import fcntl
import logging
import time
from functools import partial
from pathlib import Path

from squall.config import to_container
from squall.data.boundary import attach_driver
from squall.data.observations import ObservationSettings, ObservationWindows
from squall.data.synthetic import SyntheticSettings, generate
from squall.data.zarr_dataset import WindowDataset, format_timedelta, parse_timedelta, read_info
from squall.errors import DataError
from squall.graphs.grids import NodeSet

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def data_nodes(cfg) -> NodeSet:
    """The graph's ``data`` node set, built from ``cfg.graph.nodes.data`` (no edges needed)."""
    from squall.graphs.graph import build_nodes

    spec = to_container(cfg.graph)
    try:
        return build_nodes("data", dict(spec["nodes"]["data"]))
    except (KeyError, TypeError):
        raise DataError(
            f"graph {spec.get('name', '?')!r} has no nodes.data entry: the dataset's grid is the "
            "graph's data node set"
        ) from None


def synthetic_settings(data_cfg) -> SyntheticSettings:
    """:class:`SyntheticSettings` from ``cfg.data`` (``generator`` section plus ``frequency``)."""
    d = to_container(data_cfg)
    gen = dict(d.get("generator") or {})
    gen.pop("overwrite", None)
    variables = gen.pop("variables", None) or d.get("variables")
    if variables:
        gen["variables"] = tuple(variables)
    if "lifetime_days" in gen:
        gen["lifetime_days"] = tuple(gen["lifetime_days"])
    gen.setdefault("frequency", d.get("frequency", "6h"))
    known = set(SyntheticSettings.__dataclass_fields__)
    unknown = sorted(set(gen) - known)
    if unknown:
        raise DataError(f"data.generator has unknown keys {unknown}; known: {sorted(known)}")
    return SyntheticSettings(**gen)


def check_source(cfg) -> None:
    """Raise :class:`DataError` now when the configured dataset is not synthetic and is missing
    or unreadable (metadata only: milliseconds), so a job fails before it opens a tracking run or
    builds anything."""
    if str(cfg.data.get("source", "zarr")) != "synthetic":
        read_info(Path(str(cfg.data.path)))


def ensure_dataset(cfg, nodes: NodeSet | None = None) -> Path:
    """Path of the configured dataset, generating it first if it is synthetic and missing.

    Parameters
    ----------
    cfg : DictConfig
        Full config (``data`` and ``graph`` sections).
    nodes : NodeSet, optional
        The graph's data nodes if already built; else built from ``cfg.graph``.

    Returns
    -------
    Path
        The dataset path. Raises :class:`DataError` when it is missing and not synthetic, or,
        when ``nodes`` is given, when its grid is not ``nodes``.
    """
    path = Path(str(cfg.data.path))
    if path.exists():
        if nodes is not None:
            read_info(path).check_grid(len(nodes), nodes.latlon)
        return path
    source = str(cfg.data.get("source", "zarr"))
    if source != "synthetic":
        read_info(path)  # raises the missing-dataset error with the generation hint
    nodes = nodes if nodes is not None else data_nodes(cfg)
    settings = synthetic_settings(cfg.data)
    grid = str(nodes.meta.get("grid") or cfg.graph.get("name", ""))
    # Every rank of a job may get here at once: one generates, the others wait for its store.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if path.exists():
                return path
            log.info("dataset %s not found: generating a synthetic one (%d times on %s, %d "
                     "points)", path, settings.num_times, grid, len(nodes))  # fmt: skip
            return generate(path, nodes, settings, grid_name=grid)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_dataset(cfg, split: str = "train", rollout: int = 1, grid_indices=None,
                  normaliser=None, check: bool = True) -> WindowDataset:  # fmt: skip
    """The :class:`WindowDataset` of ``split`` as configured in ``cfg.data``.

    The validation and test splits use the normaliser of the training statistics given by
    ``normaliser`` (pass ``train.normaliser``); by default each uses the dataset statistics.
    With ``check``, every chunk of the split's times must be stored and intact
    (:meth:`WindowDataset.check_complete`, a :class:`DataError` naming what is not). When the
    graph has boundary points and ``data.boundary`` a driver, the samples carry its values on
    them (:func:`squall.data.boundary.attach_driver`; a synthetic driver is written if missing).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
    d = cfg.data
    rng = to_container(d.get(split)) or {}
    obs = d.get("observations")
    make = WindowDataset
    if obs is not None:  # samples with synthetic observations (squall.data.observations)
        make = partial(ObservationWindows, observations=ObservationSettings.from_cfg(obs))
    dataset = make(
        str(d.path),
        variables=to_container(d.get("variables")),
        input_steps=int(d.get("input_steps", 1)),
        rollout=int(rollout),
        start=rng.get("start"),
        end=rng.get("end"),
        timestep=d.get("timestep"),
        grid_indices=grid_indices,
        member=int(d.get("member", 0)),
        normaliser=normaliser,
        normalisation=to_container(d.get("normalisation")),
    )
    expected = d.get("frequency")
    if expected is not None and parse_timedelta(expected) != dataset.info.frequency:
        raise DataError(
            f"dataset {dataset.path} has frequency {format_timedelta(dataset.info.frequency)} but "
            f"data.frequency is {expected}: set data.frequency to match the dataset"
        )
    if check:
        start = time.perf_counter()
        chunks = dataset.check_complete()
        log.debug("dataset %s: %d chunks of the %s split present and intact (%.2f s)",
                  dataset.path, chunks, split, time.perf_counter() - start)  # fmt: skip
    attach_driver(cfg, dataset)
    return dataset


def variable_roles(cfg, variables) -> dict[str, list[int]]:
    """Indices (into ``variables``) of ``prognostic``, ``forcing`` and ``diagnostic`` variables.

    Forcings are inputs only, diagnostics outputs only, prognostic variables both.
    """
    d = cfg.data
    forcings = set(to_container(d.get("forcings")) or ())
    diagnostics = set(to_container(d.get("diagnostics")) or ())
    unknown = (forcings | diagnostics) - set(variables)
    if unknown:
        raise DataError(
            f"data.forcings/diagnostics name {sorted(unknown)} which are not among the chosen "
            f"variables {list(variables)}"
        )
    if forcings & diagnostics:
        raise DataError(
            f"variables {sorted(forcings & diagnostics)} are both forcing and diagnostic"
        )
    return {
        "prognostic": [i for i, v in enumerate(variables) if v not in forcings | diagnostics],
        "forcing": [i for i, v in enumerate(variables) if v in forcings],
        "diagnostic": [i for i, v in enumerate(variables) if v in diagnostics],
    }
