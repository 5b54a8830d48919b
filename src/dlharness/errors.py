"""Bad input: the one exception type the CLIs turn into a one-line message and exit code 2."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: a flag, a config value, a path, a tracking URI.

    The message is shown to the user as is, on one line, so it should name the fix.
    """


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
