"""The scripts in examples/ run as a reader would run them."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from dlharness.tracking.checkpointing.artifacts import stored_epochs
from dlharness.tracking.checkpointing.logged_models import checkpoint_models

from ..conftest import PYTHON, REPO, artifact_paths, cli_env, empty_store

EXAMPLE = REPO / "examples" / "own_module.py"


def run_example(tmp_path, *args: str) -> str:
    done = subprocess.run(
        [PYTHON, str(EXAMPLE), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_own_module_example_under_two_process_ddp_then_resumed_in_one(tmp_path, monkeypatch):
    uri = empty_store(tmp_path)
    out = run_example(
        tmp_path, "--max-epochs", "2", "--devices", "2", "--strategy", "ddp", "--tracking-uri", uri
    )
    run_id = re.search(r"^run ([0-9a-f]{32}): best epoch \d", out, re.MULTILINE).group(1)
    client = MlflowClient(uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "own-module"]
    [run] = client.search_runs([experiment.experiment_id])  # rank 1 logged nothing
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert stored_epochs(client, run_id) == [0, 1]
    # One model per checkpoint, from rank 0 alone.
    models = checkpoint_models(client, experiment.experiment_id, run_id)
    assert (
        sorted(models) == [0, 1]
        and len(client.search_logged_models([experiment.experiment_id])) == 2
    )

    # Resumed as a reader would, in this process (a fresh interpreter spends ≈10 s on imports).
    monkeypatch.chdir(tmp_path)
    argv = ["--resume", run_id, "--max-epochs", "3", "--tracking-uri", uri]
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), *argv])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("val_loss", "val_acc", "train_loss_epoch"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 1, 2], key
    assert stored_epochs(client, run_id) == [0, 1, 2]
    assert sorted(checkpoint_models(client, experiment.experiment_id, run_id)) == [0, 1, 2]
    pictures = {p for p in artifact_paths(client, run_id) if p.startswith("images/")}
    assert {f"images/val_confusion_matrix+step+{e}.png" for e in range(3)} <= pictures
    assert run.data.params["hidden"] == "64" and run.data.params["batch_size"] == "64"
