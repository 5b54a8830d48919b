"""Bad input: what the CLIs turn into one line and an exit code (2 for usage errors)."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name if it has none."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


class UsageError(Exception):
    """Bad input from the user: a flag, a config value, a path, a tracking URI.

    The message is shown to the user as is, on one line, so it should name the fix.
    """


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class BadImageError(Exception):
    """An image file that could not be decoded while training read it.

    `run_id` and `tracking_uri` say which run it ended, once the harness knows."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def one_line(self) -> str:
        """The message, also when a loader's worker process raised it: PyTorch raises it again
        in the training process with the worker's traceback in front."""
        last = str(self).strip().splitlines()[-1]
        return last.split("BadImageError: ", 1)[-1]
