"""Stop signals of a training job: SIGTERM and SIGUSR1 end it cleanly, and it can be resumed.

``SIGTERM`` comes from ``scancel``, preemption, ``kill`` or a container runtime stopping;
``SIGUSR1`` is Slurm's warning before the time limit (``#SBATCH --signal=B:USR1@300``, passed on
to the tasks by ``jobs/slurm/env.sh``). Both mean the same to a training job:

* during start-up (graph, dataset generation, model build) the start-up is interrupted at once,
  there being nothing worth saving;
* during training the current step finishes, every rank stops at the same step and a checkpoint
  is written.

Either way the job then marks its MLflow run ``KILLED`` (tagged with the signal and whether a
checkpoint exists) and exits with :data:`STOPPED_EXIT_CODE`; running it again with the same
``training.run_dir`` continues from the checkpoint in the same MLflow run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: Exit status of a job stopped by a signal after saving what there was to save: sysexits'
#: ``EX_TEMPFAIL`` ("temporary failure, try again later"). Distinct from success (0), a crash (1),
#: a user error (2) and a process killed by a signal before it could clean up (128 + signal
#: number in a shell, e.g. 143 for SIGTERM).
STOPPED_EXIT_CODE = 75

_active: StopSignals | None = None


class Stopped(BaseException):
    """A stop signal interrupted the job's start-up.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that code catching ``Exception`` to
    explain a failure does not turn the stop into an error.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Catch ``signals`` (:data:`STOP_SIGNALS` by default) while the ``with`` block runs.

    Handlers can only be installed in the main thread: elsewhere nothing is caught and the
    previous handlers stay.

    Starts in start-up mode, where the first signal raises :class:`Stopped` at once; after
    :meth:`training_started` a signal is only recorded (:attr:`signum`), and the training loop
    stops at the end of its step. :meth:`deferred` records without raising for a section that
    must not be cut (creating the tracking run), and raises when the section is over.
    """

    def __init__(self, immediate: bool = True, signals=STOP_SIGNALS) -> None:
        self.signum: int | None = None
        self.immediate = immediate
        self.signals = tuple(signals)
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal_name(self.signum)

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}
            self._outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._previous:
            _active = self._outer
        self._previous = {}

    def _handle(self, signum: int, _frame) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self.immediate and first:
            log.warning("%s during start-up: stopping", signal_name(signum))
            raise Stopped(signum)
        if first:
            log.warning("%s: checkpointing at the end of this step, then stopping",
                        signal_name(signum))  # fmt: skip
        else:
            log.warning("%s: already stopping", signal_name(signum))

    def training_started(self) -> None:
        """From now on a signal stops the loop at the end of its step."""
        self.immediate = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a start-up stop until the end of the block, then raise it."""
        was, self.immediate = self.immediate, False
        try:
            yield
        finally:
            self.immediate = was
        if was and self.signum is not None:
            raise Stopped(self.signum)


def active() -> StopSignals | None:
    """The :class:`StopSignals` installed by the running job, if any."""
    return _active
