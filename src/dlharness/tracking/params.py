"""Settings as MLflow params: flattened to dotted keys, stringified, logged once per run."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dlharness.tracking.redaction import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow's limits: a param value holds at most 6000 characters, a batch at most 100 params;
# keys use these characters.
MAX_PARAM_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
PARAM_KEY = re.compile(r"[\w\-. /]{1,250}")
# Params cannot change once logged: a different value now (say a longer `trainer.max_epochs`
# on resume) is kept as this tag instead.
CHANGED_PARAM_TAG = "dlharness.resumed_with."


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def as_param_values(values: Mapping[str, Any]) -> dict[str, str]:
    """Flattened, stringified (None as ""), cut to MLflow's length; keys MLflow refuses dropped."""
    return {
        key: ("" if value is None else str(value))[:MAX_PARAM_LENGTH]
        for key, value in flatten(values).items()
        if PARAM_KEY.fullmatch(key)
    }


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log the params the run lacks, secret-looking values redacted; a value that differs from
    the one the run holds goes to a `CHANGED_PARAM_TAG` tag."""
    from mlflow.entities import Param, RunTag

    logged = client.get_run(run_id).data.params
    safe = redact(dict(params))
    new = [Param(k, v) for k, v in safe.items() if k not in logged]
    changed = [
        RunTag(f"{CHANGED_PARAM_TAG}{k}", v) for k, v in safe.items() if logged.get(k, v) != v
    ]
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])
    if changed:
        client.log_batch(run_id, tags=changed)


def set_missing_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Set the tags the run does not hold yet (a value MLflow or the user set stays),
    secret-looking values redacted."""
    from mlflow.entities import RunTag

    held = client.get_run(run_id).data.tags
    missing = [RunTag(k, v) for k, v in redact(dict(tags)).items() if k not in held]
    if missing:
        client.log_batch(run_id, tags=missing)
