"""Which checkpoints MlflowTracking keeps and which epoch is best: each row an epoch history."""

from __future__ import annotations

import math

import pytest
import torch

from dlharness import MlflowTracking


@pytest.mark.parametrize(
    ("stored", "best", "keep_last", "dropped"),
    [
        ([0, 1, 2], None, None, []),  # keep all
        ([0, 1, 2], None, 2, [0]),
        ([0, 1, 2, 3], 0, 2, [1]),  # the best stays beyond the last two
        ([0, 1, 2, 3], 3, 2, [0, 1]),  # the best is among the last two
        ([0, 1, 2, 3], 2, 1, [0, 1]),
        ([5], 5, 1, []),
    ],
)
def test_retention_keeps_the_last_k_and_the_best(stored, best, keep_last, dropped):
    tracking = MlflowTracking(keep_last=keep_last, monitor="val/loss")
    tracking.stored_epochs, tracking.best_epoch = list(stored), best
    assert tracking._beyond_retention() == dropped


@pytest.mark.parametrize(
    ("mode", "values", "best_epoch"),
    [
        ("min", [0.9, 0.5, 0.7], 1),
        ("max", [0.9, 0.5, 0.7], 0),
        ("min", [0.9, math.nan, 0.95], 0),  # a NaN epoch is never the best
        ("min", [0.5, 0.5, 0.4], 2),  # a tie keeps the earlier; a better value wins
        ("max", [math.nan, 0.2], 1),
    ],
)
def test_the_best_epoch_follows_the_monitor_and_its_mode(mode, values, best_epoch):
    tracking = MlflowTracking(monitor="val/acc", mode=mode)
    for epoch, value in enumerate(values):
        tracking._update_best(epoch, {"val/acc": torch.tensor(value)})
    assert tracking.best_epoch == best_epoch


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "best"}, "mode must be 'min' or 'max'"),
        ({"every_n_epochs": 0}, "every_n_epochs must be >= 1"),
        ({"keep_last": 0}, "keep_last must be >= 1 or None"),
        ({"class_names": ["only"]}, "class_names must name at least 2 classes"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"class_names": ["a", "b"], "num_classes": 3}, "contradicts 2 class_names"),
        ({"monitor": " "}, "monitor must name a metric"),
    ],
)
def test_misuse_is_refused_when_the_callback_is_made(arguments, message):
    with pytest.raises(ValueError, match=message):
        MlflowTracking(**arguments)
