"""Which files of an image folder can be read: a cheap look at every header before training,
and a record of the files that fail only when decoded."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dlharness.errors import first_line

# What PIL raises for a file it cannot identify or decode (a truncated file is an OSError).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def why_unreadable(exc: BaseException) -> str:
    text = first_line(exc)
    # PIL names the file in its message; the path is given beside it already.
    return text.split(" '", 1)[0] if text.startswith("cannot identify image file") else text


def unreadable_headers(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, why) of each file that an opened header already shows is no image: empty, or
    of no format PIL knows. Opening reads the header only (a few KB), not the pixels."""
    bad = []
    for path in paths:
        try:
            if os.path.getsize(path) == 0:
                bad.append((path, "empty file"))
                continue
            with Image.open(path):
                pass
        except DECODE_ERRORS as exc:
            bad.append((path, why_unreadable(exc)))
    return bad


class DecodeFailures:
    """Files that failed to decode while loading, shared by the loader's worker processes: each
    process appends to a file of its own in one folder, which the training process reads."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="dlharness-bad-images-"))

    def record(self, path: str, why: str) -> None:
        with open(self.folder / f"{os.getpid()}.txt", "a", encoding="utf-8") as log:
            log.write(f"{path}\t{why}\n")

    def found(self) -> list[tuple[str, str]]:
        """(path, why) of every file recorded, each once, in path order."""
        seen: dict[str, str] = {}
        for log in sorted(self.folder.glob("*.txt")):
            for line in log.read_text(encoding="utf-8").splitlines():
                path, _, why = line.partition("\t")
                seen.setdefault(path, why)
        return sorted(seen.items())
