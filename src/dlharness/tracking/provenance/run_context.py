"""What a run used, logged once when fitting starts: machine, software, source, settings, model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from dlharness.tracking.provenance.environment import (
    collect_environment,
    environment_tags,
    git_state,
)
from dlharness.tracking.provenance.installed_packages import installed_requirements
from dlharness.tracking.redaction import redact
from dlharness.tracking.spool import SpoolingClient

MODEL_SUMMARY = "model_summary.txt"


def set_run_tags(run_id: str, tags: Mapping[str, Any], client: MlflowClient) -> None:
    """Several tags in one call, secret-looking values redacted."""
    safe = redact({key: str(value) for key, value in tags.items()})
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in safe.items()])


def log_environment(
    client: MlflowClient,
    run_id: str,
    accelerator: str,
    devices: int,
    precision: str,
    nodes: int = 1,
) -> None:
    env = collect_environment(accelerator, devices, precision, nodes)
    set_run_tags(run_id, environment_tags(env), client)


def log_source(client: SpoolingClient, run_id: str, source_dir: Path) -> None:
    """`requirements.txt` with every installed version, and the git state of `source_dir`."""
    client.log_text(run_id, installed_requirements(), "requirements.txt")
    state = git_state(source_dir)
    if state is None:
        return
    set_run_tags(run_id, {"git.dirty": str(state.dirty).lower()}, client)
    # MLflow sets the commit itself when the entry point lives in the checkout; a notebook or a
    # test runner's entry point leaves it unset.
    client.set_missing_tags(run_id, {MLFLOW_GIT_COMMIT: state.commit})


def log_model_description(
    client: MlflowClient, run_id: str, summary: str, tags: Mapping[str, str]
) -> None:
    client.log_text(run_id, summary, MODEL_SUMMARY)
    set_run_tags(run_id, tags, client)
