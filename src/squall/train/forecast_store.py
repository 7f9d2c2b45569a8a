"""The forecast store: a rollout's denormalised fields in zarr, written while the next step computes.

Layout (zarr format 2)
----------------------
``data``
    float32 ``[start, step, variable, grid]`` (an ensemble's: ``[start, step, member, variable,
    grid]``), in the variables' own units; NaN where nothing was written.

One chunk holds every variable of one field (one start, step and member), as anemoi-style
datasets hold one date per chunk: a step's write is one file, however many variables there are.
A field above :data:`MAX_CHUNK_BYTES` is split over several chunks of whole variables. No two
fields share a chunk, so several writers (the data-parallel ranks of a rollout, each with its own
starts) may fill one store.

Measured on an H200 host (profiling/results/forecast.md): the earlier writer, which denormalised
and transposed each field on the host (o320: 245 + 209 ms a field) and had zarr write a chunk per
variable (o96: 64 ms a field against 21 ms as one chunk), added 23 to 80 % to a 60-step rollout;
this one adds 0.2 % (o96_l6) and 0.9 % (o320_l7, 10.1 GB), and the rollout never waits for it.

Group attributes: ``variables``, ``initial_dates``, ``lead_hours``, ``layout``, ``compression``,
``complete`` (``false`` until every field is on disk and the writer closed), ``fields_written``
and, after a failure or a stop, ``error``.

Compression (``forecast.compression``): ``none`` writes the bytes as they are; ``lz4`` and
``zstd`` are Blosc with byte shuffle (``lz4`` level 5 is zarr's own default, ``zstd`` level 3
packs tighter and costs more CPU). On random fields (the benchmark's; weather fields compress
better) lz4 stored 7 % less and added 0.8 % to an o96_l6 rollout against 0.2 % raw; an o320
field took one host thread 107 ms (lz4, ratio 1.09) and 308 ms (zstd, 1.15) longer than raw.
``none`` is the default: the fastest, and the disk is the likelier bottleneck.

How a field gets to disk
------------------------
:meth:`FieldWriter.put` runs on the rollout's thread and only queues work on the GPU: it
denormalises the field and lays it out ``[variable, grid]`` on the compute stream (the field may
be a CUDA graph's output, overwritten by the next replay), then copies it into a free pinned host
buffer on a stream of its own (``non_blocking``: the next step's kernels do not wait for the
copy). A writer thread waits for that copy, compresses and writes each chunk to a temporary file
renamed into place (a killed process leaves whole chunks or none, never a torn one). Compression
(Blosc), the copy wait and the file write run without Python's lock, so the rollout's thread
keeps launching kernels meanwhile. Buffers are bounded: when all ``queue_size + threads`` are
waiting for the disk, ``put`` blocks (host memory stays bounded however slow the disk) and the
time it waited is :attr:`FieldWriter.wait_s`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from squall.errors import ConfigError, SquallError

#: Writer threads: one writes a field while the next one's device-to-host copy lands; the work
#: outside Python's lock (compression, file writes) lets a second thread use a second core. With
#: 2, an o320_l7 rollout (168 MB a field every 255 ms) never waited for the writer on an H200
#: host; 8 threads were slower than 2 with the earlier chunk-per-variable writer.
WRITE_THREADS = 2

#: Largest chunk: a quarter of a Blosc frame's 2 GiB limit. o320's 100-variable field (168 MB)
#: is one chunk; O1280's (2.6 GB) five.
MAX_CHUNK_BYTES = 512 * 2**20

#: ``forecast.compression`` -> Blosc's (codec, level), with byte shuffle; ``none``: raw bytes.
COMPRESSIONS = {"none": None, "lz4": ("lz4", 5), "zstd": ("zstd", 3)}


class ForecastWriteError(SquallError):
    """Writing the forecast fields failed; the store is marked incomplete."""


def _compressor(compression: str):
    if compression not in COMPRESSIONS:
        raise ConfigError(f"forecast.compression={compression!r}: choose "
                          f"{', '.join(COMPRESSIONS)}")  # fmt: skip
    spec = COMPRESSIONS[compression]
    if spec is None:
        return None
    from numcodecs import Blosc

    return Blosc(cname=spec[0], clevel=spec[1], shuffle=Blosc.SHUFFLE)


def variables_per_chunk(variables: int, grid: int) -> int:
    """Whole variables of one field per chunk: all of them unless that is over
    :data:`MAX_CHUNK_BYTES`."""
    return max(1, min(variables, MAX_CHUNK_BYTES // (4 * grid)))


def create_store(path: Path, shape: tuple[int, ...], attrs: dict,
                 compression: str = "none") -> None:  # fmt: skip
    """A new store for ``shape = (starts, steps, variables, grid)`` fields, or ``(starts, steps,
    members, variables, grid)`` for an ensemble, marked incomplete."""
    import zarr

    compressor = _compressor(compression)
    variables, grid = shape[-2:]
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    chunks = (1,) * (len(shape) - 2) + (variables_per_chunk(variables, grid), grid)
    root.create_array("data", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan,
                      compressors=compressor)  # fmt: skip
    layout = ("data[start, step, variable, grid]" if len(shape) == 4
              else "data[start, step, member, variable, grid]")  # fmt: skip
    root.attrs.update({**attrs, "layout": layout, "compression": compression,
                       "complete": False, "fields_written": 0})  # fmt: skip


def finish_store(path: Path, written: int, expected: int, error: str | None) -> None:
    """Record in the store's attributes how many fields it holds and whether that is all."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    attrs = {"fields_written": written, "complete": error is None and written == expected}
    if error is not None:
        attrs["error"] = error
    root.attrs.update(attrs)


class FieldWriter:
    """Writes forecast fields into a store made by :func:`create_store`, in background threads.

    Parameters
    ----------
    path : Path
        The zarr group.
    device : torch.device
        Where the fields come from.
    normaliser : squall.data.normalise.Normaliser or None
        Turns the model's normalised fields into the variables' own units (applied on
        ``device``); ``None`` writes the fields as they come.
    queue_size : int
        Fields waiting for the disk before :meth:`put` blocks.
    threads : int
        Writer threads; host memory holds ``queue_size + threads`` fields.

    An error in a thread is raised, once, as :class:`ForecastWriteError` by the next :meth:`put`
    or by :meth:`close`; the fields after it are not written.
    """

    def __init__(self, path: Path, device: torch.device, normaliser=None, queue_size: int = 4,
                 threads: int = WRITE_THREADS) -> None:  # fmt: skip
        import zarr
        from zarr.storage import LocalStore

        if queue_size < 1:
            raise ConfigError(f"forecast.write_queue={queue_size} must be >= 1")
        self.path, self.device = Path(path), device
        self.array = zarr.open_group(str(path), mode="r+")["data"]
        variables, grid = self.array.shape[-2:]
        self.per_chunk = int(self.array.chunks[-2])
        md = self.array.metadata
        self._compressor = md.compressor
        # chunks go straight to files where zarr would write the same bytes: a local store,
        # C order, no filters, raw or Blosc (zarr's own path copies each chunk twice more)
        self._dir = None
        if (isinstance(self.array.store, LocalStore) and md.order == "C" and not md.filters
                and getattr(self._compressor, "codec_id", "blosc") == "blosc"):  # fmt: skip
            self._dir = Path(self.array.store.root) / self.array.path
        self._scale = self._offset = None
        if normaliser is not None:
            self._scale = normaliser.scale.to(device, torch.float32)[:, None]  # [V, 1]
            self._offset = normaliser.offset.to(device, torch.float32)[:, None]
        cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._free: queue.Queue = queue.Queue()
        threads = max(1, threads)
        for _ in range(queue_size + threads):
            self._free.put(torch.empty((variables, grid), dtype=torch.float32, pin_memory=cuda))
        self._work: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._error_at: tuple[int, int] | None = None
        self._raised = False
        self.written = 0
        self.wait_s = 0.0
        self._threads = [threading.Thread(target=self._run, name=f"squall-forecast-writer{i}",
                                          daemon=True)
                         for i in range(threads)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def _layout(self, field: torch.Tensor, out: torch.Tensor) -> None:
        """``out [V, G] = denormalise(field [G, V])``: the normaliser's ``x * scale + offset``,
        in fp32, as two operations (bitwise what it gives on the CPU)."""
        if self._scale is None:
            out.copy_(field.t())
        else:
            torch.mul(field.t(), self._scale, out=out)
            out.add_(self._offset)

    def put(self, start: int, step: int, field: torch.Tensor, member: int | None = None) -> None:
        """Queue ``field [G, V]`` (normalised, on the rollout's device) for ``data[start, step]``
        (``data[start, step, member]`` in an ensemble's store)."""
        self._check()
        began = time.perf_counter()
        buf = self._free.get()  # the thread hands every buffer back, after an error too
        self.wait_s += time.perf_counter() - began
        event = None
        if field.device.type == "cuda":
            staged = torch.empty(buf.shape, dtype=torch.float32, device=field.device)
            self._layout(field, staged)  # on the compute stream, before the next replay
            self._copy_stream.wait_stream(torch.cuda.current_stream(field.device))
            with torch.cuda.stream(self._copy_stream):
                buf.copy_(staged, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            staged.record_stream(self._copy_stream)
        else:
            self._layout(field, buf)
        self._work.put((start, step, member, buf, event))

    def _write(self, where: tuple[int, ...], field: np.ndarray) -> None:
        """``data[where] = field [V, G]``, chunk by chunk."""
        for first in range(0, field.shape[0], self.per_chunk):
            block = field[first : first + self.per_chunk]
            if self._dir is None:
                self.array[(*where, slice(first, first + len(block)))] = block
                continue
            key = self.array.metadata.encode_chunk_key((*where, first // self.per_chunk, 0))
            if len(block) < self.per_chunk:  # zarr stores an edge chunk whole, padded with NaN
                block = np.concatenate([block, np.full((self.per_chunk - len(block),
                                                        block.shape[1]), np.nan, block.dtype)])  # fmt: skip
            payload = block if self._compressor is None else self._compressor.encode(block)
            target = self._dir / key
            partial = self._dir / f".{key}.{uuid.uuid4().hex}.partial"
            try:
                with open(partial, "wb") as out:
                    out.write(payload)  # a C-contiguous array writes its bytes, no copy
                os.replace(partial, target)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            start, step, member, buf, event = item
            if self._error is None:
                try:
                    if event is not None:
                        event.synchronize()
                    where = (start, step) if member is None else (start, step, member)
                    self._write(where, buf.numpy())
                    with self._lock:
                        self.written += 1
                except BaseException as err:  # noqa: BLE001 - reported by put / close
                    with self._lock:
                        if self._error is None:
                            self._error, self._error_at = err, (start, step)
            self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            start, step = self._error_at
            first = str(self._error).splitlines()[0] if str(self._error) else ""
            raise ForecastWriteError(
                f"writing forecast fields to {self.path} failed at start {start}, step "
                f"{step + 1} ({type(self._error).__name__}: {first}); {self.written} fields "
                "were written, the store is marked incomplete (attrs complete=false)")  # fmt: skip

    def close(self) -> None:
        """Wait until every queued field is on disk; raise the thread's error if there was one."""
        alive = [t for t in self._threads if t.is_alive()]
        for _ in alive:
            self._work.put(None)
        for thread in alive:
            thread.join()
        self._check()

    def abort(self) -> None:
        """Write what is queued and stop (an error or a stop signal elsewhere); never raises."""
        try:
            self.close()
        except ForecastWriteError:
            pass
