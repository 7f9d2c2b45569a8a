"""Progress bars for long work (set-up, dataset generation, graph builds, training, sweeps).

One convention everywhere: a tqdm bar on an interactive terminal, on the first rank only; in
non-interactive logs (batch jobs, CI, pipes) no bar, but a plain log line at most every
``LOG_EVERY_S`` seconds so a log still shows the job is alive. ``SQUALL_PROGRESS=0`` turns both
off, ``SQUALL_PROGRESS=1`` forces the bar (e.g. under ``srun --pty``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: A log line every 30 s keeps a batch log readable (a 10-minute job writes 20 lines) and still
#: shows within half a minute that a job hangs.
LOG_EVERY_S = 30.0

_log = logging.getLogger("squall.progress")


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside distributed jobs).

    Read from the variables torchrun (``RANK``), Slurm (``SLURM_PROCID``) and MPI-style launchers
    (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``) set, before any process group exists.
    """
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def is_first_rank() -> bool:
    """True on the process that prints progress and run-level log lines."""
    return launch_rank() == 0


def _mode(stream) -> str:
    """``bar``, ``log`` or ``off`` for this process."""
    setting = os.environ.get("SQUALL_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "off", "no") or not is_first_rank():
        return "off"
    if setting in ("1", "true", "on", "yes"):
        return "bar"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


class Progress:
    """A progress counter: a tqdm bar, a throttled log line, or nothing (see module docstring).

    Parameters
    ----------
    total : int or None
        Units of work expected (``None``: unknown).
    desc : str
        What is being done, e.g. ``"generating dataset"``.
    unit : str
        Name of one unit (``"step"``, ``"time"``, ``"point"``).
    stream
        Where the bar is drawn (stderr by default).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self._postfix = ""
        self._stream = stream if stream is not None else sys.stderr
        self._mode = _mode(self._stream)
        self._bar = None
        self._start = self._last_log = time.monotonic()
        if self._mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self._stream,
                             dynamic_ncols=True, leave=True)  # fmt: skip

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._mode == "log":
            now = time.monotonic()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                _log.info("%s", self._line(now))

    def set_postfix(self, text: str) -> None:
        """Extra state shown after the counter (e.g. ``"loss 0.31"``, ``"2 pending"``)."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def _line(self, now: float) -> str:
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        extra = f", {self._postfix}" if self._postfix else ""
        return f"{self.desc}: {done} {self.unit} in {now - self._start:.0f} s{extra}"

    def close(self) -> None:
        """Finish the bar (or write one closing log line if anything was counted)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._mode == "log" and time.monotonic() - self._start >= LOG_EVERY_S:
            _log.info("%s (done)", self._line(time.monotonic()))
        self._mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterate over ``items`` with a :class:`Progress` counter."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()
