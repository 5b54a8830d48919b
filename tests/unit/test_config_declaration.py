"""Each config key is declared once; the flags, the choices checked, docs/configuration.md and
the README's flag table come from that declaration or agree with it."""

from __future__ import annotations

import re

import pytest

from dlharness.errors import UsageError
from dlharness.training.cli import FLAGS, SWITCHES, TAG_FLAG, build_parser, overrides_from_args
from dlharness.training.config import declared_keys, load_config, shown
from dlharness.training.config_reference import markdown

from ..conftest import REPO

WITH_CHOICES = [key for key in declared_keys() if key.choices]


def test_every_key_says_what_it_does():
    assert all(key.help.strip() for key in declared_keys())


def test_every_declared_flag_sets_its_key_and_nothing_else():
    declared = {key.flag: key.dotted for key in declared_keys() if key.flag}
    made = {flag: dotted for flag, dotted, *_ in (*FLAGS, *SWITCHES)} | dict([TAG_FLAG])
    assert made == declared
    parser = build_parser()
    for flag, dotted, type_, choices, _ in FLAGS:
        value = choices[-1] if choices else {int: "3", float: "0.5", str: "x"}[type_]
        args = parser.parse_args([flag, value])
        assert overrides_from_args(args) == {dotted: type_(value)}, flag


@pytest.mark.parametrize("key", WITH_CHOICES, ids=lambda key: key.dotted)
def test_a_value_outside_the_declared_choices_is_refused_listing_them(key):
    with pytest.raises(UsageError) as refused:
        load_config(None, {key.dotted: "no-such-choice"})
    assert str(refused.value) == (
        f"{key.dotted} 'no-such-choice' is not one of: {', '.join(key.choices)}"
    )


def test_the_configuration_page_is_generated_from_the_declaration():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert page == markdown(), "stale: run python scripts/config_reference.py"
    assert len(re.findall(r"^\| `[a-z_.]+` \|", page, re.M)) == len(declared_keys())


def test_the_readme_flag_table_names_each_flags_key_and_default():
    rows = re.findall(
        r"^\| `(--[a-z-]+)[^`]*` \| `([a-z_.]+)` \| ([^|]*) \|",
        (REPO / "README.md").read_text(),
        re.M,
    )
    keys = {key.dotted: key for key in declared_keys()}
    assert {dotted for _, dotted, _ in rows} == {k.dotted for k in keys.values() if k.flag}
    for flag, dotted, default in rows:
        key = keys[dotted]
        assert flag == key.flag
        written = default.strip()
        # A default in code or as none/off is the declared one; prose ("MLflow's") explains one.
        if written.startswith("`") and written.count("`") == 2:
            assert written.strip("`") == shown(key.default), flag
        elif written in ("none", "off", "on"):
            assert written == shown(key.default), flag
