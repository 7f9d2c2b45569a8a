"""Zarr datasets in an anemoi-datasets-like layout, and a torch Dataset of training windows.

Layout (zarr format 2 on disk, as anemoi-datasets writes)
---------------------------------------------------------
``data``
    float32 ``[time, variable, ensemble, grid]``, one time per chunk.
``dates``
    ``datetime64[s]`` ``[time]``, evenly spaced by ``frequency``.
``latitudes``, ``longitudes``
    float64 ``[grid]`` in degrees.
``mean``, ``stdev``, ``minimum``, ``maximum``
    float64 ``[variable]`` over every time, member and grid point.
``area_weights`` (optional)
    float64 ``[grid]``, mean 1; without it weights are derived from the latitudes.

Group attributes: ``variables`` (names in order), ``name_to_index``, ``start_date``, ``end_date``,
``frequency`` (e.g. ``"6h"``), ``resolution`` (grid name), ``ensemble_dimension`` (= 2, the axis
of ``data``), ``statistics_start_date``/``statistics_end_date`` and ``format_version``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from squall.data.normalise import Normaliser, area_weights_from_latitudes
from squall.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATISTICS = ("mean", "stdev", "minimum", "maximum")
GENERATE_HINT = "generate one with `python -m jobs.make_dataset data.path=<path>`"

_TIMEDELTA = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT = {"s": "s", "m": "m", "h": "h", "d": "D"}


def parse_timedelta(text) -> np.timedelta64:
    """``"6h"``, ``"30m"``, ``"1d"`` or a number of hours -> ``timedelta64[s]``."""
    if isinstance(text, (int, np.integer)):
        return np.timedelta64(int(text), "h").astype("timedelta64[s]")
    match = _TIMEDELTA.match(str(text))
    if match is None or int(match[1]) == 0:
        raise DataError(f"time step {text!r} is not understood: write e.g. '6h', '30m' or '1d'")
    return np.timedelta64(int(match[1]), _UNIT[match[2]]).astype("timedelta64[s]")


def format_timedelta(step: np.timedelta64) -> str:
    seconds = int(step.astype("timedelta64[s]").astype(np.int64))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _zarr():
    import zarr

    return zarr


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class DatasetWriter:
    """Write a dataset block by block; statistics accumulate as blocks arrive.

    Use as a context manager. The store is built under a temporary name next to ``path`` and
    renamed on a clean exit, so an interrupted run never leaves a store that looks complete, and
    processes writing the same path at once leave one complete store.
    """

    def __init__(self, path, variables, dates, frequency, latitudes, longitudes, *,
                 members=1, area_weights=None, resolution="", attrs=None, overwrite=False):  # fmt: skip
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"dataset {self.path} already exists: delete it or pass overwrite")
        self.variables = list(variables)
        self.dates = np.asarray(dates).astype("datetime64[s]")
        self.overwrite = overwrite
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        shape = (len(self.dates), len(self.variables), int(members), len(latitudes))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        zarr = _zarr()
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        self.data = self.group.create_array(
            "data", shape=shape, chunks=(1, *shape[1:]), dtype="float32", fill_value=np.nan
        )
        self.group.create_array("dates", data=self.dates)
        self.group.create_array("latitudes", data=np.asarray(latitudes, dtype=np.float64))
        self.group.create_array("longitudes", data=np.asarray(longitudes, dtype=np.float64))
        if area_weights is not None:
            self.group.create_array("area_weights", data=np.asarray(area_weights, np.float64))
        self.group.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "variables": self.variables,
                "name_to_index": {v: i for i, v in enumerate(self.variables)},
                "start_date": str(self.dates[0]),
                "end_date": str(self.dates[-1]),
                "frequency": str(frequency),
                "resolution": str(resolution),
                "ensemble_dimension": 2,
                **(attrs or {}),
            }
        )
        v = len(self.variables)
        # Sums are taken about the first block's mean: avoids cancellation for fields such as
        # pressure (mean 1e5 Pa, stdev 1e3 Pa).
        self._shift = None
        self._sum, self._sumsq = np.zeros(v), np.zeros(v)
        self._min, self._max = np.full(v, np.inf), np.full(v, -np.inf)
        self._count = 0
        self._written = np.zeros(shape[0], dtype=bool)

    def write(self, first: int, block: np.ndarray) -> None:
        """Write ``block [T, variable, ensemble, grid]`` at times ``first .. first + T - 1``."""
        block = np.asarray(block, dtype=np.float32)
        if block.shape[1:] != self.data.shape[1:]:
            raise DataError(f"block shape {block.shape[1:]} != dataset {self.data.shape[1:]}")
        if not np.isfinite(block).all():
            raise DataError(f"block at time index {first} holds NaN or inf values")
        self.data[first : first + len(block)] = block
        self._written[first : first + len(block)] = True
        if self._shift is None:
            self._shift = block.mean(axis=(0, 2, 3), dtype=np.float64)
        for v in range(block.shape[1]):  # one variable at a time: no full float64 copy
            x = block[:, v].ravel()
            d = x.astype(np.float64) - self._shift[v]
            self._sum[v] += d.sum()
            self._sumsq[v] += d @ d
            self._min[v] = min(self._min[v], float(x.min()))
            self._max[v] = max(self._max[v], float(x.max()))
        self._count += block[:, 0].size

    def close(self) -> None:
        if not self._written.all():
            missing = int((~self._written).sum())
            raise DataError(f"dataset {self.path}: {missing} time steps were never written")
        m = self._sum / self._count
        var = np.maximum(self._sumsq / self._count - m * m, 0.0)
        values = (self._shift + m, np.sqrt(var), self._min, self._max)
        for name, value in zip(STATISTICS, values, strict=True):
            self.group.create_array(name, data=value)
        self.group.attrs.update(
            {
                "statistics_start_date": str(self.dates[0]),
                "statistics_end_date": str(self.dates[-1]),
            }
        )
        if self.path.exists() and self.overwrite:
            shutil.rmtree(self.path)
        try:
            os.rename(self.tmp, self.path)
        except OSError:
            if not (self.path / ".zgroup").exists():
                raise
            # Another process finished the same dataset first: keep theirs.
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _open_group(path: Path):
    if not path.exists():
        raise DataError(
            f"dataset {path} does not exist: {GENERATE_HINT.replace('<path>', str(path))}"
        )
    try:
        group = _zarr().open_group(str(path), mode="r")
        data = group["data"]
    except Exception as err:  # zarr raises many types for a broken store
        raise DataError(
            f"dataset {path} is not a readable zarr dataset ({type(err).__name__}: {err}); "
            f"delete it and regenerate or re-copy it"
        ) from None
    return group, data


#: A Blosc frame starts with 16 bytes: version, versionlz, flags, typesize, then little-endian
#: uint32 nbytes (uncompressed), blocksize and cbytes (the whole frame, header included).
BLOSC_HEADER_BYTES = 16
#: Chunks named in a completeness error; the rest are counted.
MAX_NAMED_CHUNKS = 5


def _blosc_only(data) -> bool:
    """Whether each stored chunk of ``data`` is one raw Blosc frame (zarr 2 or 3 metadata)."""
    md = data.metadata
    if getattr(md, "zarr_format", None) == 2:
        return not md.filters and getattr(md.compressor, "codec_id", None) == "blosc"
    from zarr.codecs import BloscCodec, BytesCodec

    codecs = tuple(getattr(md, "codecs", ()))
    return (
        len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
    )


def _blosc_problem(size: int, head: bytes, expected_nbytes: int) -> str | None:
    """Why a stored Blosc chunk of ``size`` bytes starting with ``head`` is damaged, or None."""
    if size < BLOSC_HEADER_BYTES or len(head) < BLOSC_HEADER_BYTES:
        return f"{size} bytes, shorter than a Blosc header"
    nbytes, _, cbytes = np.frombuffer(head[4:16], dtype="<u4").tolist()
    if cbytes != size:
        return f"{size} bytes stored, the Blosc header says {cbytes}"
    if nbytes != expected_nbytes:
        return f"decompresses to {nbytes} bytes, a chunk holds {expected_nbytes}"
    return None


def check_chunks(path, first: int = 0, last: int | None = None, decode: bool = False) -> int:
    """Raise :class:`DataError` unless every chunk of ``data`` holding times ``first..last`` is
    stored and intact; return the number of chunks checked.

    zarr fills a missing chunk with the fill value (NaN here) without a word, and a truncated one
    fails only when first read (inside a DataLoader worker): this finds both before training.
    Each chunk's size is compared with its Blosc header (16 bytes read per chunk, no
    decompression); chunks in another codec, or all chunks with ``decode``, are read in full.

    Measured on 2 busy cores (load 8, warm page cache), 400 times x 14 variables, best / median
    of 5: O32 (61 MB stored) headers 0.056 / 0.060 s, full decode 0.93 / 2.0 s; O96 (431 MB)
    headers 0.018 / 0.026 s, full decode 1.7 / 2.5 s. A full read grows with the data (an O1280
    archive holds terabytes, read from a parallel file system) while the header check costs one
    small read per chunk, so headers are the default. The header check cannot see damage inside
    a frame of the right length (Blosc keeps no checksum); such a chunk fails when read, as one
    :class:`DataError` line.
    """
    path = Path(path)
    group, data = _open_group(path)
    times = int(data.shape[0])
    last = times - 1 if last is None else min(int(last), times - 1)
    first = max(int(first), 0)
    if last < first:
        return 0
    md, per_chunk = data.metadata, tuple(int(c) for c in data.chunks)
    grid = [range(n) for n in data.cdata_shape[1:]]
    coords = [(c, *rest) for c in range(first // per_chunk[0], last // per_chunk[0] + 1)
              for rest in np.ndindex(*(len(r) for r in grid))]  # fmt: skip
    prefix = f"{data.path}/" if data.path else ""
    keys = [prefix + md.encode_chunk_key(c) for c in coords]
    expected = int(np.prod(per_chunk)) * data.dtype.itemsize
    heads = _read_heads(data.store, keys)
    blosc = _blosc_only(data) and not decode
    missing, damaged = [], []
    for c, found in zip(coords, heads, strict=True):
        if isinstance(found, BaseException):
            damaged.append((c, f"{type(found).__name__}: {found}"))
        elif found is None:
            missing.append(c)
        elif blosc:
            problem = _blosc_problem(*found, expected)
            if problem is not None:
                damaged.append((c, problem))
        else:
            region = tuple(slice(i * n, (i + 1) * n) for i, n in zip(c, per_chunk, strict=True))
            try:
                data[region]
            except Exception as err:  # codecs raise many types for a damaged chunk
                damaged.append((c, f"{type(err).__name__}: {err}"))
    if missing or damaged:
        dates = group["dates"][:].astype("datetime64[s]") if "dates" in group else None
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(coords)} chunks missing ("
                         f"{_name_chunks(missing, per_chunk, times, dates)})")  # fmt: skip
        if damaged:
            named = [_name_chunks([c], per_chunk, times, dates) + f": {why}" for c, why in damaged]
            more = len(named) - MAX_NAMED_CHUNKS
            parts.append(f"{len(damaged)} unreadable (" + "; ".join(named[:MAX_NAMED_CHUNKS])
                         + (f"; and {more} more" if more > 0 else "") + ")")  # fmt: skip
        raise DataError(f"dataset {path} is incomplete: {' and '.join(parts)}; regenerate "
                        "or re-copy it")  # fmt: skip
    return len(coords)


#: Threads reading chunk headers: enough to overlap the per-file latency of a parallel file
#: system (about 1 ms a file on Lustre), few enough not to flood its metadata server.
HEAD_READERS = 16


def _read_heads(store, keys: list[str]) -> list:
    """``(size, first bytes)`` of each key, None where it is not stored, or the exception.

    A local store is read with plain file calls in batches on a few threads (measured on 400
    chunks: zarr's async path 0.4 to 0.9 ms a chunk, plain reads 0.02 to 0.08 ms); other stores
    go through zarr's store API.
    """
    from zarr.storage import LocalStore

    if isinstance(store, LocalStore):
        from concurrent.futures import ThreadPoolExecutor

        root = Path(store.root)

        def batch(part):
            out = []
            for key in part:
                try:
                    with open(root / key, "rb") as fh:
                        out.append((os.fstat(fh.fileno()).st_size, fh.read(BLOSC_HEADER_BYTES)))
                except FileNotFoundError:
                    out.append(None)
                except OSError as err:
                    out.append(err)
            return out

        size = -(-len(keys) // HEAD_READERS)
        parts = [keys[i : i + size] for i in range(0, len(keys), size)]
        with ThreadPoolExecutor(max_workers=HEAD_READERS) as pool:
            return [found for part in pool.map(batch, parts) for found in part]

    import asyncio

    from zarr.abc.store import RangeByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()

    async def one(key):
        head = await store.get(key, proto, byte_range=RangeByteRequest(0, BLOSC_HEADER_BYTES))
        if head is None:
            return None
        return await store.getsize(key), head.to_bytes()

    async def every():
        return await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)

    return sync(every())


def _name_chunks(coords, per_chunk, times: int, dates) -> str:
    """``time 5 (2020-01-02T06:00:00)`` for each chunk, the first few, then a count."""
    names = []
    for c in coords[:MAX_NAMED_CHUNKS]:
        lo, hi = c[0] * per_chunk[0], min((c[0] + 1) * per_chunk[0], times) - 1
        span = f"time {lo}" if lo == hi else f"times {lo}..{hi}"
        when = f" ({dates[lo]})" if dates is not None and lo < len(dates) else ""
        rest = f" chunk {'.'.join(map(str, c))}" if any(c[1:]) else ""
        names.append(span + when + rest)
    more = len(coords) - MAX_NAMED_CHUNKS
    return ", ".join(names) + (f", and {more} more" if more > 0 else "")


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Metadata of a dataset: everything except the data, read once.

    Attributes
    ----------
    path : Path
    variables : tuple of str
    dates : np.ndarray
        ``datetime64[s]`` ``[time]``.
    frequency : np.timedelta64
    latitudes, longitudes : np.ndarray
        ``[grid]`` degrees.
    statistics : dict of str to np.ndarray
        ``mean``, ``stdev``, ``minimum``, ``maximum``, each ``[variable]``.
    area_weights : np.ndarray
        ``[grid]``, mean 1 (stored, or derived from latitudes).
    shape : tuple of int
        Shape of ``data``.
    attrs : dict
    """

    path: Path
    variables: tuple
    dates: np.ndarray
    frequency: np.timedelta64
    latitudes: np.ndarray
    longitudes: np.ndarray
    statistics: dict
    area_weights: np.ndarray
    shape: tuple
    attrs: dict

    @property
    def num_grid(self) -> int:
        return int(self.shape[3])

    def index_of(self, names) -> list[int]:
        """Positions of ``names`` in the dataset; :class:`DataError` listing what is available."""
        lookup = {v: i for i, v in enumerate(self.variables)}
        missing = [n for n in names if n not in lookup]
        if missing:
            raise DataError(
                f"variable(s) {', '.join(missing)} not in dataset {self.path}; "
                f"available: {', '.join(self.variables)}"
            )
        return [lookup[n] for n in names]

    def time_range(self, start=None, end=None) -> tuple[int, int]:
        """Inclusive index range ``[i0, i1]`` of times in ``[start, end]``.

        ``start``/``end`` are dates (str or datetime64), integer indices (negative counts from the
        end) or None (the dataset's first/last time). The range is clipped to the dataset.
        """
        n = len(self.dates)

        def to_index(value, default, side):
            if value is None:
                return default
            if isinstance(value, (int, np.integer)):
                return int(value) + n if value < 0 else int(value)
            try:
                date = np.datetime64(str(value), "s")
            except ValueError:
                raise DataError(
                    f"time range bound {value!r} is neither a date nor an index"
                ) from None
            return int(np.searchsorted(self.dates, date, side=side)) - (side == "right")

        return max(to_index(start, 0, "left"), 0), min(to_index(end, n - 1, "right"), n - 1)

    def check_grid(self, num_nodes: int, latlon_rad: np.ndarray | None = None, tol_deg=1e-4):
        """Raise :class:`DataError` unless the dataset's grid is the graph's data grid."""
        if self.num_grid != num_nodes:
            raise DataError(
                f"dataset {self.path} has {self.num_grid} grid points but the graph's data nodes "
                f"number {num_nodes}: regenerate the dataset on this graph or choose the graph "
                f"built on the dataset's grid ({self.attrs.get('resolution') or 'unknown'})"
            )
        if latlon_rad is not None:
            lat, lon = np.degrees(latlon_rad[:, 0]), np.degrees(latlon_rad[:, 1])
            dlat = np.abs(self.latitudes - lat)
            dlon = np.abs((self.longitudes - lon + 180.0) % 360.0 - 180.0) * (np.abs(lat) < 90)
            worst = float(max(dlat.max(), dlon.max()))
            if worst > tol_deg:
                raise DataError(
                    f"dataset {self.path} grid points differ from the graph's data nodes by up to "
                    f"{worst:.3g} deg (same count, other grid or order): regenerate the dataset"
                )


def read_info(path) -> DatasetInfo:
    """Read and check the metadata of the dataset at ``path``."""
    path = Path(path)
    group, data = _open_group(path)
    attrs = dict(group.attrs)
    try:
        variables = tuple(attrs["variables"])
        dates = group["dates"][:].astype("datetime64[s]")
        stats = {k: np.asarray(group[k][:], dtype=np.float64) for k in STATISTICS}
        lat = np.asarray(group["latitudes"][:], dtype=np.float64)
        lon = np.asarray(group["longitudes"][:], dtype=np.float64)
        weights = (np.asarray(group["area_weights"][:], dtype=np.float64)
                   if "area_weights" in group else area_weights_from_latitudes(lat))  # fmt: skip
        frequency = parse_timedelta(attrs.get("frequency", "6h"))
    except (KeyError, DataError) as err:
        raise DataError(
            f"dataset {path} lacks {err} (not an anemoi/squall dataset?); regenerate or re-copy it"
        ) from None
    shape = tuple(int(x) for x in data.shape)
    problems = []
    if len(shape) != 4:
        problems.append(f"data has {len(shape)} dimensions, expected 4")
    else:
        if len(variables) != shape[1]:
            problems.append(f"{len(variables)} variable names for {shape[1]} variables")
        if len(dates) != shape[0]:
            problems.append(f"{len(dates)} dates for {shape[0]} times")
        if lat.shape != (shape[3],) or lon.shape != (shape[3],):
            problems.append(f"{lat.size} latitudes for {shape[3]} grid points")
        if any(v.shape != (shape[1],) for v in stats.values()):
            problems.append("statistics do not have one value per variable")
    if len(dates) > 1 and np.any(np.diff(dates) != frequency):
        problems.append(f"dates are not evenly spaced by {format_timedelta(frequency)}")
    if problems:
        raise DataError(f"dataset {path} is inconsistent: {'; '.join(problems)}; regenerate it")
    return DatasetInfo(path, variables, dates, frequency, lat, lon, stats, weights, shape, attrs)


# ----------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------


class WindowDataset(torch.utils.data.Dataset):
    """Samples of ``input_steps`` past states and ``rollout`` future states.

    Sample ``k`` is a dict: ``x`` float32 ``[input_steps, grid, variable]`` at times
    ``t - (input_steps - 1) s, ..., t`` and ``y`` float32 ``[rollout, grid, variable]`` at
    ``t + s, ..., t + rollout s`` (``s`` = ``timestep`` / dataset frequency), both normalised;
    ``index`` is ``t``, the dataset time index of the last input state (its date is
    ``dataset.dates[index]``). Every time of a window lies in the requested range. With a
    ``boundary`` driver (:func:`squall.data.boundary.attach_driver`), ``boundary`` float32
    ``[input_steps + rollout, P, V_b]`` holds the driver's values on the boundary points at every
    time of the window, normalised.

    The zarr store is opened on first access in each process, so the dataset pickles cheaply to
    DataLoader workers. Reads fetch whole time chunks; ``grid_indices`` then keeps a rank's rows.

    Parameters
    ----------
    path : str or Path
        Zarr dataset.
    variables : sequence of str, optional
        Variables in the order the model wants them; default all.
    input_steps : int
        Number of past states in ``x`` (multi-step input).
    rollout : int
        Number of target states in ``y``.
    start, end : str, datetime64, int or None
        Inclusive time range (dates or indices; see :meth:`DatasetInfo.time_range`).
    timestep : str, optional
        Model time step, a multiple of the dataset frequency; default the frequency.
    grid_indices : array of int, optional
        Grid points to return (in this order); default all.
    member : int
        Ensemble member to read.
    normaliser : Normaliser, optional
        Default: ``Normaliser.from_statistics`` of the chosen variables with ``normalisation``.
    normalisation : dict, optional
        Method per variable, see :meth:`Normaliser.from_statistics`.
    """

    def __init__(self, path, variables=None, input_steps=1, rollout=1, start=None, end=None,
                 timestep=None, grid_indices=None, member=0, normaliser=None,
                 normalisation=None):  # fmt: skip
        self.info = info = read_info(path)
        self.path = info.path
        self.variables = tuple(variables) if variables is not None else info.variables
        self.var_index = np.asarray(info.index_of(self.variables))
        if input_steps < 1 or rollout < 0:
            raise DataError(f"need input_steps >= 1 and rollout >= 0, got {input_steps}, {rollout}")
        self.input_steps, self.rollout = int(input_steps), int(rollout)
        step = info.frequency if timestep is None else parse_timedelta(timestep)
        ratio = step.astype(np.int64) / info.frequency.astype(np.int64)
        if ratio != int(ratio) or ratio < 1:
            raise DataError(
                f"time step {format_timedelta(step)} is not a multiple of dataset {self.path} "
                f"frequency {format_timedelta(info.frequency)}"
            )
        self.stride = int(ratio)
        if not 0 <= member < info.shape[2]:
            raise DataError(f"member {member} not in dataset {self.path} ({info.shape[2]} members)")
        self.member = int(member)
        self.first, self.last = info.time_range(start, end)
        span = (self.input_steps - 1 + self.rollout) * self.stride + 1
        available = self.last - self.first + 1
        if available < span:
            lo = info.dates[min(max(self.first, 0), len(info.dates) - 1)]
            hi = info.dates[max(min(self.last, len(info.dates) - 1), 0)]
            raise DataError(
                f"dataset {self.path}: range {start}..{end} holds {max(available, 0)} times "
                f"({lo}..{hi}) but input_steps={self.input_steps} + rollout={self.rollout} at "
                f"stride {self.stride} needs {span}; widen the range or generate more times"
            )
        self.num_windows = available - span + 1
        if grid_indices is not None:
            grid_indices = np.asarray(grid_indices, dtype=np.int64)
            if (
                grid_indices.ndim != 1
                or grid_indices.size == 0
                or (grid_indices.min() < 0 or grid_indices.max() >= info.num_grid)
            ):
                raise DataError(
                    f"grid_indices must be a non-empty 1-D array within [0, {info.num_grid})"
                )
        self.grid_indices = grid_indices
        if normaliser is None:
            stats = {k: v[self.var_index] for k, v in info.statistics.items()}
            normaliser = Normaliser.from_statistics(self.variables, stats, normalisation)
        if tuple(normaliser.variables) != self.variables:
            raise DataError(
                f"normaliser variables {list(normaliser.variables)} differ from the dataset's "
                f"{list(self.variables)}: build both from the same data config"
            )
        self.normaliser = normaliser
        self._offset = normaliser.offset.numpy().astype(np.float32)
        self._scale = normaliser.scale.numpy().astype(np.float32)
        self._data = None
        self._pid = None
        self.boundary = None  # a squall.data.boundary.BoundaryDriver

    # -- metadata -------------------------------------------------------------------------------

    @property
    def statistics(self) -> dict:
        """Statistics of the chosen variables, each ``[variable]``."""
        return {k: v[self.var_index] for k, v in self.info.statistics.items()}

    def _grid(self, values):
        return values if self.grid_indices is None else values[self.grid_indices]

    @property
    def latitudes(self) -> np.ndarray:
        return self._grid(self.info.latitudes)

    @property
    def longitudes(self) -> np.ndarray:
        return self._grid(self.info.longitudes)

    @property
    def area_weights(self) -> np.ndarray:
        """Area weights of the returned grid points (mean 1 over the whole grid)."""
        return self._grid(self.info.area_weights)

    @property
    def dates(self) -> np.ndarray:
        return self.info.dates

    def check_complete(self, decode: bool = False) -> int:
        """Raise :class:`DataError` unless every chunk of this range is stored and intact (see
        :func:`check_chunks`); return the number of chunks checked."""
        return check_chunks(self.path, self.first, self.last, decode=decode)

    def window_times(self, k: int) -> np.ndarray:
        """Dataset time indices of sample ``k``: inputs then targets."""
        t = self.first + (self.input_steps - 1) * self.stride + k
        return t + self.stride * np.arange(-(self.input_steps - 1), self.rollout + 1)

    # -- data -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_data"], state["_pid"] = None, None
        return state

    def _array(self):
        if self._data is None or self._pid != os.getpid():
            self._data = _open_group(self.path)[1]
            self._pid = os.getpid()
        return self._data

    def read(self, times: np.ndarray) -> np.ndarray:
        """Raw values ``[len(times), grid, variable]`` (float32, not normalised)."""
        lo, hi = int(times[0]), int(times[-1])
        step = int(times[1] - times[0]) if len(times) > 1 else 1
        try:
            block = self._array()[lo : hi + 1 : step, :, self.member]  # [T, V_all, G_all]
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"dataset {self.path}: reading times {lo}..{hi} failed ({type(err).__name__}: "
                f"{err}); the store may be corrupt, regenerate or re-copy it"
            ) from None
        block = block[:, self.var_index]
        if self.grid_indices is not None:
            block = block[:, :, self.grid_indices]
        return np.ascontiguousarray(block.transpose(0, 2, 1), dtype=np.float32)

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window {k} out of range [0, {self.num_windows})")
        times = self.window_times(k)
        values = (self.read(times) - self._offset) / self._scale
        n = self.input_steps
        sample = {
            "x": torch.from_numpy(values[:n]),
            "y": torch.from_numpy(values[n:]),
            "index": int(times[n - 1]),
        }
        if self.boundary is not None:
            sample["boundary"] = torch.from_numpy(self.boundary.values(self.info.dates[times]))
        return sample


def make_dataloader(dataset, batch_size=1, shuffle=False, num_workers=0, seed=0, drop_last=False,
                    sampler=None, prefetch_factor=2, pin_memory=False):  # fmt: skip
    """DataLoader over ``dataset`` with workers that open the store themselves.

    Shuffling draws from a generator seeded with ``seed`` (reproducible order). Workers persist
    across epochs and each keeps its own open store. A :class:`DataError` raised in a worker
    reaches the caller as the worker's one-line message (torch's re-raise carries the worker's
    whole traceback in the message).
    """
    generator = torch.Generator().manual_seed(int(seed)) if sampler is None and shuffle else None
    kwargs = {}
    if num_workers > 0:
        kwargs = {"persistent_workers": True, "prefetch_factor": prefetch_factor}
    return _DataLoader(
        dataset,
        collate_fn=getattr(dataset, "collate_fn", None),  # observations pack their own
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
        **kwargs,
    )


class _DataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose iterators turn a worker's :class:`DataError` back into one line."""

    def __iter__(self):
        return _OneLineErrors(super().__iter__())


class _OneLineErrors:
    def __init__(self, iterator) -> None:
        self._iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except DataError as err:
            raise DataError(worker_message(err)) from None

    def __len__(self) -> int:
        return len(self._iterator)


def worker_message(err: BaseException) -> str:
    """The original one-line message of an exception re-raised from a DataLoader worker.

    torch re-raises a worker's exception as the same type with the message ``Caught X in
    DataLoader worker process N.`` followed by the worker's traceback, whose last line is
    ``module.X: <original message>``. Other messages are returned unchanged.
    """
    text = str(err)
    if not (text.startswith("Caught ") and "DataLoader worker" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.rsplit(".", 1)[-1] == type(err).__name__ else last
