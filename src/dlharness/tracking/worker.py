"""A background thread for tracking I/O, so that uploads and plots do not stall training."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class TrackingWarning(UserWarning):
    """A tracking step failed; training went on without it."""


class TrackingWorker:
    """Runs tracking jobs one at a time, in the order they were submitted.

    One thread keeps the order that matters (a checkpoint is stored before the metrics of its
    epoch, a plot after the values it shows). A failing job is reported as a `TrackingWarning`,
    once per kind of job, and never reaches the training loop.

    Jobs must not run torch operations: the first one on this thread starts a second OpenMP
    thread team that keeps competing with training for the cores (measured here: digits
    epochs went from 0.5 s to 1.0 s). Hand jobs numpy arrays and files instead.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlharness-tracking")
        self._pending: list[Future] = []
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        # Seconds spent per kind of job, for the benchmark's breakdown of tracking cost.
        self.seconds: dict[str, float] = {}

    def submit(self, what: str, job: Callable[..., Any], *args: Any) -> Future:
        future = self._executor.submit(self._guarded, what, job, *args)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [future]
        return future

    def run_now(self, what: str, job: Callable[..., Any], *args: Any) -> Any:
        """Run `job` on the calling thread after everything queued so far, guarded the same way."""
        self.flush()
        return self._guarded(what, job, *args)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        self.flush()
        self._executor.shutdown(wait=True)

    def _guarded(self, what: str, job: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return job(*args)
        except Exception as exc:
            self.report(what, exc)
            return None
        finally:
            with self._lock:
                self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - start

    def report(self, what: str, exc: BaseException) -> None:
        with self._lock:
            first_time = what not in self._reported
            self._reported.add(what)
        if first_time:
            warnings.warn(
                f"dlharness: {what} failed and was skipped ({type(exc).__name__}: {exc}); "
                "training continues",
                TrackingWarning,
                stacklevel=2,
            )
