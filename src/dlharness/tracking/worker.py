"""A background thread for tracking I/O, so that uploads and plots do not stall training."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# Write errors that waiting cannot fix: the artifact store's disk is full, over quota,
# read-only or refuses this user.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class TrackingWarning(UserWarning):
    """A tracking step failed; training went on without it."""


class StorageError(Exception):
    """The artifact store refuses writes, so nothing more can be kept: training must stop."""

    run_id: str | None = None


def as_storage_error(what: str, exc: OSError) -> StorageError | None:
    """`exc` as a StorageError when it is one of STORAGE_ERRNOS, else None."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return StorageError(f"{what} failed: {exc.strerror}{where}")


# Niceness of the tracking thread: the lowest. Its jobs then run in the cycles training
# leaves idle (between torch's parallel regions, while the loader collates) instead of taking
# a core from a torch thread, which stalls the whole parallel op; the queue drains at the end.
TRACKING_NICENESS = 19


def yield_to_training() -> None:
    """Give the calling thread (the tracking thread, or the picture helper's only one) the
    lowest CPU priority."""
    # Linux applies niceness per thread (a thread id is a process id to setpriority).
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TRACKING_NICENESS)


class TrackingWorker:
    """Runs tracking jobs one at a time, in the order they were submitted.

    One thread keeps the order that matters (a checkpoint is stored before the metrics of its
    epoch, a plot after the values it shows). A failing job is reported as a `TrackingWarning`,
    once per kind of job, and never reaches the training loop.

    Jobs must not run torch operations: the first one on this thread starts a second OpenMP
    thread team that keeps competing with training for the cores (it doubled the digits
    epoch: docs/performance.md). Hand jobs numpy arrays and files instead.

    A job that meets a full, read-only or forbidden artifact store is different: more
    training would only produce more that cannot be kept. The first such failure is kept as
    `storage_error`, and `check` raises it on the training thread.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dlharness-tracking", initializer=yield_to_training
        )
        self._pending: list[Future] = []
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        # CPU seconds of this thread per kind of job, for the benchmark's breakdown of what
        # tracking costs training: wall time would count the waits of a low-priority thread.
        self.seconds: dict[str, float] = {}
        self.storage_error: StorageError | None = None

    def check(self) -> None:
        """Raise the storage failure a job met, if any (call it from the training thread)."""
        if self.storage_error is not None:
            raise self.storage_error

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
        start = time.thread_time()
        try:
            return job(*args)
        except OSError as exc:
            failure = as_storage_error(what, exc)
            if failure is None:
                self.report(what, exc)
                return None
            with self._lock:
                self.storage_error = self.storage_error or failure
            return None
        except Exception as exc:
            self.report(what, exc)
            return None
        finally:
            with self._lock:
                self.seconds[what] = self.seconds.get(what, 0.0) + time.thread_time() - start

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
