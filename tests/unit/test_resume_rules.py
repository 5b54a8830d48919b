"""Which config changes a resume takes, and which it refuses: each row a change."""

from __future__ import annotations

import pytest

from dlharness.app.config import TrainConfig
from dlharness.app.resume import SAFE_ON_RESUME, apply_overrides
from dlharness.errors import UsageError
from dlharness.tracking.params import flatten

LOGGED = TrainConfig().to_dict()

TAKEN = [
    ("trainer.max_epochs", 40),
    ("trainer.accelerator", "gpu"),
    ("data.data_dir", "/elsewhere"),
    ("data.num_workers", 4),
    ("tracker.keep_last_checkpoints", 2),
    ("tracking.tags", {"author": "ana"}),
]
REFUSED = [
    ("optim.lr", 0.1),
    ("data.dataset", "mnist"),
    ("model.name", "resnet18"),
    ("seed", 7),
    ("data.skip_bad_images", True),
    ("trainer.precision", "bf16-mixed"),
]


@pytest.mark.parametrize(("key", "value"), TAKEN)
def test_a_resume_takes(key, value):
    assert key in SAFE_ON_RESUME
    section, name = key.split(".")
    assert apply_overrides(LOGGED, {key: value})[section][name] == value


@pytest.mark.parametrize(("key", "value"), REFUSED)
def test_a_resume_refuses_naming_both_values(key, value):
    with pytest.raises(UsageError, match=rf"{key} cannot change when resuming \(the run has"):
        apply_overrides(LOGGED, {key: value})


@pytest.mark.parametrize(("key", "value"), REFUSED)
def test_the_logged_value_itself_is_no_change(key, value):
    same = flatten(LOGGED)[key]
    assert flatten(apply_overrides(LOGGED, {key: same}))[key] == same
