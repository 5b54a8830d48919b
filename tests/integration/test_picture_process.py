"""The helper process that draws the tracked pictures: the same files as drawing in-process,
errors and a dead helper handled, nothing left running."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest

from dlharness.tracking.pictures.process import PictureProcess
from dlharness.tracking.worker import TRACKING_NICENESS

MATRIX = np.array([[5, 1, 0], [0, 6, 2], [1, 0, 7]])
NAMES = ("cat", "dog", "bird")
HISTORY = {
    e: {"train/loss": 1 / (e + 1), "val/loss": 1.2 / (e + 1), "val/acc": e / 4} for e in range(4)
}


def draw_both(pictures: PictureProcess, folder):
    folder.mkdir()
    pictures.draw("confusion", MATRIX, NAMES, "epoch 3", folder / "c.png", folder / "c.webp")
    pictures.draw("curves", HISTORY, folder)
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_the_helper_writes_the_same_files_as_drawing_here_at_the_lowest_priority(tmp_path):
    helper = PictureProcess()
    try:
        files = draw_both(helper, tmp_path / "helper")
        assert helper.running
        assert psutil.Process(helper.pid).nice() == TRACKING_NICENESS
        assert helper.helper_seconds > 0
    finally:
        helper.close()
    here = draw_both(PictureProcess(in_subprocess=False), tmp_path / "here")
    assert set(files) == {"c.png", "c.webp", "loss_curves.png", "metric_curves.png"}
    assert files == here
    assert not helper.running


def test_an_error_in_the_helper_is_raised_here_and_the_helper_goes_on(tmp_path):
    helper = PictureProcess()
    try:
        with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
            helper.draw(
                "confusion", "not a matrix", NAMES, "t", tmp_path / "a.png", tmp_path / "a.webp"
            )
        pid = helper.pid
        helper.draw("curves", HISTORY, tmp_path)
        assert helper.pid == pid and (tmp_path / "loss_curves.png").stat().st_size > 0
    finally:
        helper.close()


def test_a_dead_helper_is_replaced_by_drawing_here(tmp_path):
    children_before = {child.pid for child in psutil.Process().children()}
    helper = PictureProcess()
    try:
        helper.draw("curves", HISTORY, tmp_path)
        child = psutil.Process(helper.pid)
        os.kill(helper.pid, signal.SIGKILL)
        child.wait(10)
        helper.draw("confusion", MATRIX, NAMES, "t", tmp_path / "c.png", tmp_path / "c.webp")
        assert (tmp_path / "c.png").stat().st_size > 0
        assert not helper.running and helper.pid is None
    finally:
        helper.close()
    assert {child.pid for child in psutil.Process().children()} <= children_before
