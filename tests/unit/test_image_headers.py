"""The look at every file of an image folder before training: each row a file as real folders
hold them and what the look says of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dlharness.data.image_files import DecodeFailures, unreadable_headers


def image_bytes(fmt: str, mode: str = "RGB", side: int = 24) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


FILES = [
    # (name, content, what the look says: None = passes)
    ("ok.png", image_bytes("PNG"), None),
    ("ok.jpg", image_bytes("JPEG"), None),
    ("grey.png", image_bytes("PNG", "L"), None),
    ("palette.gif", image_bytes("GIF", "P"), None),
    ("photo.webp", image_bytes("WEBP"), None),
    ("empty.png", b"", "empty file"),
    ("page.jpg", b"<!doctype html><html>404 Not Found</html>", "cannot identify image file"),
    ("noise.png", bytes(range(256)) * 4, "cannot identify image file"),
    # Cut short after its header: only decoding finds it (the loader's job).
    ("half.jpg", image_bytes("JPEG", side=128)[:4000], None),
]


@pytest.mark.parametrize(("name", "content", "said"), FILES, ids=[f[0] for f in FILES])
def test_the_header_look(tmp_path, name, content, said):
    path = tmp_path / name
    path.write_bytes(content)
    found = unreadable_headers([str(path)])
    if said is None:
        assert found == []
    else:
        [(where, why)] = found
        assert where == str(path) and why.startswith(said), why


def test_decode_failures_from_several_processes_are_read_once_each_in_order(tmp_path):
    failures = DecodeFailures()
    failures.record("b.jpg", "image file is truncated")
    failures.record("a.jpg", "broken data stream")
    failures.record("b.jpg", "image file is truncated")  # the same file, the next epoch
    (failures.folder / "99999.txt").write_text("c.jpg\tfrom a worker process\n")
    assert failures.found() == [
        ("a.jpg", "broken data stream"),
        ("b.jpg", "image file is truncated"),
        ("c.jpg", "from a worker process"),
    ]
