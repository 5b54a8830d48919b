"""Which config changes a resume takes, and which it refuses: each row a change."""

from __future__ import annotations

import re

import pytest

from dlharness.errors import UsageError
from dlharness.tracking.params import flatten
from dlharness.training.cli import build_parser, flag_keys, resumable_flags, unflagged_resumable
from dlharness.training.config import SAFE_ON_RESUME, TrainConfig, declared_keys
from dlharness.training.resume import apply_overrides

from ..conftest import REPO

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


def test_the_keys_a_resume_may_change_are_declared_once_and_listed_alike():
    """Declared on the config's fields; `--resume`'s help and docs/resume.md list them all."""
    declared = {key.dotted for key in declared_keys() if key.changes_on_resume}
    assert declared == SAFE_ON_RESUME
    flags, keys = set(resumable_flags()), set(unflagged_resumable())
    assert {dotted for flag, dotted in flag_keys() if flag in flags} | keys == SAFE_ON_RESUME
    [group] = [g for g in build_parser()._action_groups if g.title == "resume"]
    assert set(re.findall(r"--[a-z-]+", group.description)) == flags
    assert (
        set(re.findall(r"tracker\.\w+|\w+\.\w+", group.description.split("in a config")[1])) == keys
    )
    text = (REPO / "docs" / "resume.md").read_text()
    listed = text[text.index("keeps this list equal") : text.index("A checkpoint written on a GPU")]
    assert set(re.findall(r"`(--[a-z-]+)`", listed)) == flags
    assert set(re.findall(r"`([a-z_]+\.[a-z_]+)`", listed)) == keys
