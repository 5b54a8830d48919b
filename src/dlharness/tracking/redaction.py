"""Secrets never reach the tracking store: names that look secret, and passwords in URIs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# Matched anywhere in a key's name, case-insensitively: API_KEY, hf_token, db.password, …
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def redact_uri(uri: str) -> str:
    """'postgresql://user:pw@host/db' → 'postgresql://user:***@host/db'; others unchanged."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:{REDACTED}@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact(values: Mapping[str, str]) -> dict[str, str]:
    """Values of secret-looking keys replaced, and passwords cut out of URIs in the others."""
    return {
        key: REDACTED if is_secret_name(key) else redact_uri(value) for key, value in values.items()
    }


def redact_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`redact` through nested mappings, such as a whole config."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if is_secret_name(str(key)):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact_tree(value)
        elif isinstance(value, str):
            out[key] = redact_uri(value)
        else:
            out[key] = value
    return out
