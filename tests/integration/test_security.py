"""Secrets stay out of the tracking store: redacted params, tags, config and printed URIs."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dlharness.tracking.redaction import REDACTED, redact_uri
from dlharness.training.train import train

from ..conftest import tiny_config

SECRETS = ("tok-3f9a1c", "sk-live-77e2", "hunter2-db", "s3cr3t-pw")


def test_secrets_never_reach_params_tags_or_the_logged_config(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRETS[0])
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = {"api_key": SECRETS[1], "db_password": SECRETS[2], "note": "kept"}
    cfg = tiny_config(
        store,
        **{
            "tracking.tags": tags,
            "data.data_dir": f"https://reader:{SECRETS[3]}@data.example.org/digits",
            "tracker.plots": False,
        },
    )
    result = train(cfg)

    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    logged = {**run.data.params, **run.data.tags}
    for secret in SECRETS:
        assert not [key for key, value in logged.items() if secret in value], secret
    assert run.data.tags["api_key"] == run.data.tags["db_password"] == REDACTED
    assert run.data.tags["note"] == "kept"
    assert run.data.params["tracking.tags.api_key"] == REDACTED
    assert run.data.params["data.data_dir"] == "https://reader:***@data.example.org/digits"
    # Launch variables are recorded, secret ones without their value.
    assert run.data.tags["env.var.SLURM_JOB_ID"] == "4242"
    assert run.data.tags["env.var.MLFLOW_TRACKING_TOKEN"] == REDACTED
    config_text = client.download_artifacts(result.run_id, "config.yaml")
    with open(config_text) as fh:
        text = fh.read()
    assert not [secret for secret in SECRETS if secret in text]
    assert yaml.safe_load(text)["tracking"]["tags"]["note"] == "kept"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("http://alice:pa55@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("data", "data"),
    ],
)
def test_passwords_are_cut_out_of_uris(uri, shown):
    assert redact_uri(uri) == shown
