"""The real `dlharness-train` in a real process that signals and SIGKILL reach, without the
≈10 s a fresh interpreter spends importing torch, Lightning and MLflow: the process is forked
from a server that imported them once per session."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.callbacks import Callback

# Imported once by the fork server; every training process starts from its memory.
PRELOAD = ["dlharness.training.cli", "dlharness.training.train"]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run(argv: list[str], cwd: str, log_path: str, callbacks: Sequence[Callback]) -> None:
    for name in [name for name in os.environ if name.startswith("MLFLOW_")]:
        del os.environ[name]
    os.chdir(cwd)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        import dlharness.training.train as train_module
        from dlharness.training.cli import main

        if callbacks:
            train_module.train = functools.partial(train_module.train, callbacks=list(callbacks))
        code = main(argv)
    sys.exit(code)


class ForkedCli:
    """`dlharness-train ARGV` running in `cwd`, with stdout and stderr in one log file; the
    parts of `subprocess.Popen` the tests use. `callbacks` (picklable) join its training's."""

    def __init__(self, argv: list[str], cwd: Path, callbacks: Sequence[Callback] = ()) -> None:
        self.log = cwd / f"cli-{os.getpid()}-{id(self)}.log"
        args = (argv, str(cwd), str(self.log), list(callbacks))
        self.process = _context().Process(target=_run, args=args)
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
