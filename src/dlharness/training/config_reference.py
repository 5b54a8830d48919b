"""docs/configuration.md, written from the config's one declaration (`declared_keys`)."""

from __future__ import annotations

import typing

import yaml

from dlharness.training.config import declared_keys


def _type_name(key_type: object) -> str:
    """`int | None` → "int or null", as the YAML reads."""
    text = getattr(key_type, "__name__", None) if not typing.get_args(key_type) else None
    if text is not None:
        return text
    if typing.get_origin(key_type) is dict:
        return "mapping"
    return " or ".join("null" if t is type(None) else t.__name__ for t in typing.get_args(key_type))


def _as_yaml(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def markdown() -> str:
    """Every config key: its flag, type, default, choices, whether a resume may change it."""
    lines = [
        "# Configuration",
        "",
        "Every key of the run configuration (`--config FILE`, YAML sections as below; "
        "`--print-config` shows a resolved one). Generated from the declaration in "
        "`src/dlharness/training/config.py` by `python scripts/config_reference.py`; a test "
        "fails when this page and the declaration disagree.",
        "",
        "| key | flag | type | default | choices | resume may change | what it does |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in declared_keys():
        flag = f"`{key.flag}`" if key.flag else ""
        choices = ", ".join(f"`{c}`" for c in key.choices) if key.choices else ""
        resume = "yes" if key.changes_on_resume else ""
        text = key.help.replace("|", "\\|")
        lines.append(
            f"| `{key.dotted}` | {flag} | {_type_name(key.type)} | `{_as_yaml(key.default)}` "
            f"| {choices} | {resume} | {text} |"
        )
    return "\n".join(lines) + "\n"
