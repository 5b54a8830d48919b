"""The real `dlharness-train` in a real process that signals and SIGKILL reach, without the
≈10 s a fresh interpreter spends importing torch, Lightning and MLflow: the process is forked
from a server that imported them once per session."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from pathlib import Path

# Imported once by the fork server; every training process starts from its memory.
PRELOAD = ["dlharness.app.cli", "dlharness.app.train"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run(argv: list[str], cwd: str, log_path: str) -> None:
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        del os.environ[name]
    os.chdir(cwd)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        from dlharness.app.cli import main

        code = main(argv)
    sys.exit(code)


class ForkedCli:
    """`dlharness-train ARGV` running in `cwd`, with stdout and stderr in one log file; the
    parts of `subprocess.Popen` the tests use."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.log = cwd / f"cli-{os.getpid()}-{id(self)}.log"
        self.process = _context().Process(target=_run, args=(argv, str(cwd), str(self.log)))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        # multiprocessing reports a death by signal N as -N, as Popen does.
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def send_signal(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise TimeoutError(f"the training process outlived {timeout} s")
        return self.returncode
