"""A helper process that draws and encodes the tracked pictures.

Drawing a confusion matrix and encoding its PNG and WebP, or the two curve charts, takes
milliseconds of CPU an epoch, most of it Python holding the interpreter lock: on the tracking
thread every millisecond of it is one the training loop may wait to get the lock back between
torch ops. In a process of its own, at the lowest priority, the same work shares no lock with
training. It imports PIL and numpy only and is started on the first picture (its start-up
outweighed the saving on a busy 2-core machine, where no core is idle:
docs/performance.md; it is meant for machines with idle cores, such as a GPU machine's). The
tracking thread hands it a request and waits (blocked on a pipe, holding no lock); the files
it writes are then logged by the thread as before. If the helper cannot start or dies, the
pictures are drawn on the calling thread, as without it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dlharness.tracking.pictures.files import write_confusion, write_curves
from dlharness.tracking.worker import yield_to_training

# What the helper can be asked to do: name → a function writing files.
JOBS: dict[str, Callable[..., None]] = {"confusion": write_confusion, "curves": write_curves}
# Seconds to wait for the helper to exit once its input is closed, before it is killed.
EXIT_WAIT_S = 5.0


class PictureProcess:
    """Runs `JOBS` in a helper process, one request at a time, or here when it cannot.

    Args:
        in_subprocess: False draws every picture on the calling thread.
    """

    def __init__(self, in_subprocess: bool = True) -> None:
        self._child: subprocess.Popen | None = None
        self._failed = not in_subprocess
        # CPU seconds the helper has used, as it last said.
        self.helper_seconds = 0.0

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def draw(self, job: str, *args: Any) -> None:
        """Run ``JOBS[job](*args)`` in the helper; an error it meets is raised here."""
        if not self._failed:
            try:
                error, self.helper_seconds = self._ask(job, args)
            except (OSError, EOFError, pickle.PickleError):
                self._failed = True  # not started, or gone: draw here from now on
                self.close()
            else:
                if error is not None:
                    raise RuntimeError(error)
                return
        JOBS[job](*args)

    def _ask(self, job: str, args: tuple) -> tuple[str | None, float]:
        if self._child is None:
            self._child = _start()
        assert self._child.stdin is not None and self._child.stdout is not None
        pickle.dump((job, args), self._child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._child.stdin.flush()
        return pickle.load(self._child.stdout)

    def close(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.stdin.close()
        try:
            child.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        with contextlib.suppress(OSError):
            child.stdout.close()


def _start() -> subprocess.Popen:
    # The folder holding the dlharness package, first on the helper's path: it imports the
    # same code as this process even when that was found through a path set in code.
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
    )


def serve() -> None:
    """The helper's loop: a request from standard input, its reply (None or the error's
    text, and the CPU seconds used so far) to standard output, until the input closes."""
    # Ctrl-C reaches the whole process group: the parent decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield_to_training()
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    while True:
        try:
            job, args = pickle.load(requests)
        except EOFError:
            return
        try:
            JOBS[job](*args)
            reply = None
        except Exception as exc:
            reply = f"{type(exc).__name__}: {exc}"
        pickle.dump((reply, time.process_time()), replies)
        replies.flush()


if __name__ == "__main__":
    serve()
