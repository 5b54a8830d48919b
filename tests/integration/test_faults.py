"""Disk trouble, for real: an artifact store on a tiny tmpfs that fills up, or that turns
read-only mid-run. Training stops with one line, the run ends FAILED, nothing stored is lost."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.tracking.checkpointing.artifacts import fetch_checkpoint, stored_epochs
from dlharness.training.cli import main

from ..conftest import AfterStoredCheckpoint, cli_trains_with, empty_store

FAULT_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 6, accelerator: cpu}
tracking: {system_metrics: false, experiment: faults}
tracker: {keep_last_checkpoints: null, onnx: false}
"""


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real size-limited filesystem mounted at `folder` (needs root, as in CI)."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fault_lab(tmp_path: Path, artifacts: Path) -> tuple[str, Path]:
    uri = empty_store(tmp_path)
    MlflowClient(uri).create_experiment("faults", artifact_location=artifacts.as_uri())
    config = tmp_path / "faults.yaml"
    config.write_text(FAULT_YAML)
    return uri, config


def assert_failed_with_stored_checkpoints_intact(uri: str, tmp_path: Path) -> None:
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FAILED"
    epochs = stored_epochs(client, run.info.run_id)
    assert epochs, "no checkpoint was stored before the fault"
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) < 6  # stopped early
    # The last one stored is complete: its sha256 matches and it loads.
    path = fetch_checkpoint(client, run.info.run_id, epochs[-1], tmp_path / "check")
    assert torch.load(path, weights_only=True)["epoch"] == epochs[-1]
    with sqlite3.connect(tmp_path / "mlflow.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.slow
def test_full_artifact_disk_stops_training_and_fails_the_run(tmp_path, capsys):
    # ≈130 KB of checkpoint and images per epoch: room for about two epochs.
    with tmpfs(tmp_path / "artifacts", "320k") as artifacts:
        uri, config = fault_lab(tmp_path, artifacts)
        code = main(["--config", str(config), "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == 1
        message = err.strip().splitlines()[-1]
        assert message.startswith("dlharness-train: error:")
        assert "No space left on device" in message and "ended FAILED" in message
        assert "Traceback" not in err
        assert_failed_with_stored_checkpoints_intact(uri, tmp_path)


@pytest.mark.slow
def test_artifact_disk_turning_read_only_stops_training_and_fails_the_run(
    tmp_path, capsys, monkeypatch
):
    with tmpfs(tmp_path / "artifacts", "64m") as artifacts:
        uri, config = fault_lab(tmp_path, artifacts)

        def remount_read_only() -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(artifacts)], check=True)

        # Read-only once epoch 1's checkpoint is stored, before epoch 2 trains.
        fault = AfterStoredCheckpoint(artifacts, 2, remount_read_only)
        cli_trains_with(monkeypatch, fault)
        code = main(["--config", str(config), "--tracking-uri", uri])
        err = capsys.readouterr().err
        assert code == 1
        message = err.strip().splitlines()[-1]
        assert "Read-only file system" in message and "ended FAILED" in message
        assert "Traceback" not in err
        assert_failed_with_stored_checkpoints_intact(uri, tmp_path)
