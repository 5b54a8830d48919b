"""MLflow's checkpoint layout, and fetching a stored checkpoint with its integrity checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoint.pth"
METRICS_FILE = "checkpoint_metrics.json"
# The tag `mlflow.pytorch.load_checkpoint` reads to find the newest checkpoint's file name.
LATEST_CHECKPOINT_TAG = "mlflow.latest_checkpoint_artifact"
BEST_EPOCH_TAG = "dlharness.best_checkpoint_epoch"
# Bytes read per chunk when hashing (1 MiB).
_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A stored checkpoint is missing, truncated or altered."""


def epoch_dir(epoch: int) -> str:
    return f"{CHECKPOINT_DIR}/epoch_{epoch}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stored_epochs(client: MlflowClient, run_id: str) -> list[int]:
    """Epochs whose checkpoint is complete in the run: its record (written last) exists."""
    epochs = []
    for folder in client.list_artifacts(run_id, CHECKPOINT_DIR):
        name = folder.path.rsplit("/", 1)[-1]
        if not (folder.is_dir and name.startswith("epoch_") and name[6:].isdigit()):
            continue
        files = {
            item.path.rsplit("/", 1)[-1] for item in client.list_artifacts(run_id, folder.path)
        }
        if {CHECKPOINT_FILE, METRICS_FILE} <= files:
            epochs.append(int(name[6:]))
    return sorted(epochs)


def checkpoint_metadata(client: MlflowClient, run_id: str, epoch: int) -> dict[str, Any]:
    path = client.download_artifacts(run_id, f"{epoch_dir(epoch)}/{METRICS_FILE}")
    return json.loads(Path(path).read_text())


def fetch_checkpoint(client: MlflowClient, run_id: str, epoch: int, dst: Path) -> Path:
    """Download epoch `epoch`'s checkpoint into `dst` and check it against its stored sha256."""
    artifact = f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}"
    try:
        expected = checkpoint_metadata(client, run_id, epoch)["sha256"]
        path = Path(client.download_artifacts(run_id, artifact, dst_path=str(dst)))
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {artifact} of run {run_id} cannot be read: {exc}"
        ) from None
    if file_sha256(path) != expected:
        raise CheckpointError(
            f"checkpoint {artifact} of run {run_id} does not match its sha256 "
            "(truncated or altered)"
        )
    return path
