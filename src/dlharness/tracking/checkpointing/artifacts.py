"""MLflow's checkpoint layout: storing a checkpoint with its sha256 record, and getting one back
as a verified local file that loads with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlharness.errors import first_line
from dlharness.tracking.checkpointing.logged_models import MODELS_URI, model_checkpoint
from dlharness.tracking.epoch_history import metric_batches
from dlharness.tracking.provenance.installed_packages import cache_dir

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoint.pth"
METRICS_FILE = "checkpoint_metrics.json"
# The tag `mlflow.pytorch.load_checkpoint` reads to find the newest checkpoint's file name.
LATEST_CHECKPOINT_TAG = "mlflow.latest_checkpoint_artifact"
BEST_EPOCH_TAG = "dlharness.best_checkpoint_epoch"
# Bytes read per chunk when hashing (1 MiB).
_HASH_CHUNK = 1 << 20


class CheckpointError(Exception):
    """A stored checkpoint is missing, truncated, altered or unsafe to load.

    `untrusted` is True when only the file's content was refused (objects that could run code):
    ``trusted=True`` loads it anyway; `fact` is the message without that advice."""

    def __init__(self, message: str, *, untrusted: bool = False, fact: str | None = None) -> None:
        super().__init__(message)
        self.untrusted = untrusted
        self.fact = fact or message


def epoch_dir(epoch: int) -> str:
    return f"{CHECKPOINT_DIR}/epoch_{epoch}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_checkpoint(
    client: MlflowClient, run_id: str, epoch: int, partial: Path, record: dict[str, Any]
) -> dict[str, Any]:
    """Move the written `partial` file into place, then upload it and its record (the record
    last: a checkpoint without one is incomplete and never resumed from). Returns the record,
    with the file's sha256 and size; both files stay in `partial`'s folder."""
    path = partial.with_name(CHECKPOINT_FILE)
    os.replace(partial, path)  # a complete file or none, never half of one
    record = {**record, "sha256": file_sha256(path), "size_bytes": path.stat().st_size}
    path.with_name(METRICS_FILE).write_text(json.dumps(record))
    try:
        client.log_artifact(run_id, str(path), epoch_dir(epoch))
        client.log_artifact(run_id, str(path.with_name(METRICS_FILE)), epoch_dir(epoch))
    except OSError:
        # A half-copied file on a full disk: take it away (best effort) and say why.
        with contextlib.suppress(Exception):
            delete_checkpoint(client, run_id, epoch)
        raise
    return record


def tag_checkpoint(
    client: MlflowClient,
    run_id: str,
    epoch: int,
    best: int | None,
    metrics: Sequence[Metric] = (),
) -> None:
    """Tag the run's latest and best checkpoints, in one `log_batch` with `metrics` (the epoch's
    values: one database write an epoch instead of two, each milliseconds of CPU on SQLite)."""
    tags = [RunTag(LATEST_CHECKPOINT_TAG, f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}")]
    if best is not None:
        tags.append(RunTag(BEST_EPOCH_TAG, str(best)))
    *earlier, last = metric_batches(list(metrics)) or [[]]
    for batch in earlier:
        client.log_batch(run_id, metrics=batch)
    client.log_batch(run_id, metrics=last, tags=tags)


def delete_checkpoint(client: MlflowClient, run_id: str, epoch: int) -> None:
    client.delete_artifacts(run_id, epoch_dir(epoch))


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


def checkpoint_metadata(
    client: MlflowClient, run_id: str, epoch: int, dst: Path | None = None
) -> dict[str, Any]:
    """The record stored beside epoch `epoch`'s checkpoint (metrics, step, size, sha256)."""
    artifact = f"{epoch_dir(epoch)}/{METRICS_FILE}"
    path = client.download_artifacts(run_id, artifact, dst_path=str(dst) if dst else None)
    return json.loads(Path(path).read_text())


def fetch_checkpoint(client: MlflowClient, run_id: str, epoch: int, dst: Path) -> Path:
    """Download epoch `epoch`'s checkpoint into `dst` and check it against its stored sha256."""
    artifact = f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}"
    try:
        dst.mkdir(parents=True, exist_ok=True)
        expected = checkpoint_metadata(client, run_id, epoch, dst)["sha256"]
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


def load_checkpoint_safely(path: Path, artifact: str, trusted: bool = False) -> dict[str, Any]:
    """Load with ``weights_only=True`` and refuse anything that could name code to run; with
    `trusted`, load whatever the file holds (it may run code: only for a file you trust)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        # torch's message carries terminal bold codes.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        reason = text.splitlines()[0] if text else "forbidden object"
        raise CheckpointError(
            f"checkpoint {artifact} refused: it holds objects other than tensors and plain data "
            f"({reason[:160]}); nothing in it was run",
            untrusted=True,
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {artifact} is unreadable: {type(exc).__name__}: {exc}"
        ) from None
    hyper_parameters = state.get("hyper_parameters") or {}
    if not trusted and any("_instantiator" in str(key) for key in hyper_parameters):
        raise CheckpointError(
            f"checkpoint {artifact} refused: its hyperparameters name an _instantiator "
            "(a class to construct on load)",
            untrusted=True,
        )
    return state


def load_stored_checkpoint(
    run_id: str,
    epoch: int | None = None,
    *,
    tracking_uri: str | None = None,
    dst: str | os.PathLike | None = None,
    trusted: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """A run's stored checkpoint as a local file, and what it holds (`checkpoint_path`'s work,
    for callers that need the state too: the file is loaded once).

    The file is downloaded, checked against its sha256 record, and loaded once with
    ``weights_only=True`` (a checkpoint that holds code, or names an ``_instantiator``, is
    refused and nothing in it runs). `MlflowTracking` writes checkpoints that pass, whatever
    the module keeps in its hyperparameters; a file written otherwise that holds objects loads
    only with `trusted`.

    Args:
        run_id: The run that logged the checkpoints (with `MlflowTracking` or dlharness), or
            ``models:/<model_id>``: the checkpoint that LoggedModel is (then no `epoch`).
        epoch: Which epoch's checkpoint; None: the latest stored.
        tracking_uri: The tracking store; default: MLflow's current one.
        dst: Folder to download into; default: ``~/.cache/dlharness/checkpoints/RUN_ID/epoch_N``
            (``$DLHARNESS_CACHE_DIR``, ``$XDG_CACHE_HOME``).
        trusted: Load a checkpoint that holds objects other than tensors and plain data (they
            may run code when loaded: only for a file you trust), then fit with
            ``weights_only=False``. The sha256 check still applies.

    Raises:
        CheckpointError: unknown run, no such checkpoint, or one that fails a check.
    """
    client = MlflowClient(tracking_uri)
    if run_id.startswith(MODELS_URI):
        if epoch is not None:
            raise CheckpointError(f"{run_id} names one checkpoint: pass no epoch")
        try:
            run_id, epoch = model_checkpoint(client, run_id)
        except (MlflowException, ValueError) as exc:
            raise CheckpointError(f"{run_id}: {first_line(exc)}") from None
    try:
        client.get_run(run_id)
        available = stored_epochs(client, run_id)
    except MlflowException as exc:
        raise CheckpointError(f"run {run_id}: {first_line(exc)}") from None
    if not available:
        raise CheckpointError(f"run {run_id} has no logged checkpoints")
    if epoch is None:
        epoch = available[-1]
    elif epoch not in available:
        logged = ", ".join(map(str, available))
        raise CheckpointError(f"run {run_id} has no checkpoint for epoch {epoch}; logged: {logged}")
    folder = (
        Path(dst) if dst is not None else cache_dir() / "checkpoints" / run_id / f"epoch_{epoch}"
    )
    path = fetch_checkpoint(client, run_id, epoch, folder)
    artifact = f"{epoch_dir(epoch)}/{CHECKPOINT_FILE}"
    try:
        return path, load_checkpoint_safely(path, artifact, trusted)
    except CheckpointError as exc:
        if exc.untrusted:
            raise CheckpointError(
                f"{exc}; if you trust run {run_id}, pass trusted=True",
                untrusted=True,
                fact=str(exc),
            ) from None
        raise


def checkpoint_path(
    run_id: str,
    epoch: int | None = None,
    *,
    tracking_uri: str | None = None,
    dst: str | os.PathLike | None = None,
    trusted: bool = False,
) -> Path:
    """A run's stored checkpoint as a local file, for ``trainer.fit(..., ckpt_path=...)``: see
    `load_stored_checkpoint`, whose arguments and checks it shares."""
    return load_stored_checkpoint(
        run_id, epoch, tracking_uri=tracking_uri, dst=dst, trusted=trusted
    )[0]
