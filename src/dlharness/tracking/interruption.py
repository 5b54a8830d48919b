"""SIGINT and SIGTERM (Ctrl-C, pre-emption) turned into a clean stop: checkpoint, KILLED run."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):  # noqa: N818 (a stop, like KeyboardInterrupt, not an error)
    """Training stopped on a signal; its state up to the stop is logged in run `run_id`."""

    def __init__(self, signum: int, where: str = "") -> None:
        self.signum = signum
        self.where = where
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        super().__init__(f"interrupted by {signal.Signals(signum).name}{where}")

    @property
    def exit_code(self) -> int:
        # The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM.
        return 128 + self.signum


class StopSignals:
    """While active, SIGINT and SIGTERM request a stop instead of killing the process.

    Deferring (during training) a signal only records the request, which `MlflowTracking`
    honours at the next batch boundary: it stores the state, then raises `TrainingInterrupted`.
    Otherwise the signal raises it at once. A second SIGINT while
    a stop is pending raises KeyboardInterrupt, for a user who will not wait.

    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self, deferring: bool = False) -> None:
        self.requested: int | None = None
        self.deferring = deferring
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def take_back(self) -> None:
        """Handle the signals again after another handler was installed over ours (Lightning
        installs its own SIGTERM handler when `fit` starts, which would stop training at the
        next validation batch, with no state stored). `__exit__` still restores what was
        there before `__enter__`."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._handle)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        if not self.deferring:
            raise TrainingInterrupted(signum)
