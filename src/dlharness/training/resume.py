"""Finding, checking and preparing the checkpoint a run resumes from.

Everything that can refuse a resume happens here, before the run is reopened: an unknown run,
a run without checkpoints, an epoch that was not logged, a checkpoint that fails its sha256, one
that holds more than tensors and plain data, and overrides that would not continue the same
training.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from dlharness.data import ClassificationDataModule
from dlharness.data.fingerprint import content_digest
from dlharness.errors import UsageError, first_line
from dlharness.tracking.checkpointing.artifacts import (
    CheckpointError,
    checkpoint_path,
    load_stored_checkpoint,
    stored_epochs,
)
from dlharness.tracking.checkpointing.logged_models import MODELS_URI, model_checkpoint
from dlharness.tracking.params import flatten
from dlharness.tracking.store_access import server_refusal
from dlharness.training.config import SAFE_ON_RESUME, TrainConfig, from_dict, set_dotted, validate

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_RUNS_URI = re.compile(
    r"^runs:/(?P<run>[0-9a-f]{32})/checkpoints/epoch_(?P<epoch>\d+)(?:/checkpoint\.pth)?/?$"
)


@dataclass
class ResumePoint:
    """A verified checkpoint of `run_id` at `epoch`, and the config to continue with."""

    run_id: str
    epoch: int
    checkpoint: Path
    config: TrainConfig
    fork: bool
    scratch: Path
    # Loaded without weights_only: the user vouched for a file that holds objects.
    trusted: bool = False

    def cleanup(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def parse_target(target: str, epoch: int | None) -> tuple[str, int | None]:
    """``RUN_ID`` or ``runs:/RUN_ID/checkpoints/epoch_N`` → (run id, epoch or None = latest)."""
    target = target.strip()
    if match := _RUNS_URI.match(target):
        uri_epoch = int(match["epoch"])
        if epoch is not None and epoch != uri_epoch:
            raise UsageError(f"--resume-epoch {epoch} contradicts {target}; give one of them")
        return match["run"], uri_epoch
    if _RUN_ID.match(target):
        return target, epoch
    raise UsageError(
        "--resume expects a run id (32 hex digits), runs:/RUN_ID/checkpoints/epoch_N or "
        "models:/MODEL_ID, "
        f"got '{target}'"
    )


def model_target(
    client: MlflowClient, target: str, epoch: int | None, tracking_uri: str
) -> tuple[str, int]:
    """``models:/<model_id>`` of a checkpoint → (its run id, its epoch)."""
    if epoch is not None:
        raise UsageError(f"--resume-epoch cannot be combined with {target}: it names one epoch")
    try:
        return model_checkpoint(client, target)
    except (MlflowException, ValueError) as exc:
        refusal = server_refusal(exc, tracking_uri, f"to read {target}")
        raise UsageError(refusal or f"{target}: {first_line(exc)}") from None


def logged_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    try:
        path = client.download_artifacts(run_id, "config.yaml")
    except MlflowException:
        raise UsageError(f"run {run_id} has no config.yaml: it was not made by dlharness") from None
    return yaml.safe_load(Path(path).read_text())


def apply_overrides(logged: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The logged config with the safe overrides applied; any other change is refused."""
    data = yaml.safe_load(yaml.safe_dump(logged))
    flat = flatten(logged)
    for key, value in overrides.items():
        if key in SAFE_ON_RESUME:
            set_dotted(data, key, value)
        elif str(flat.get(key)) != str(value):
            raise UsageError(
                f"{key} cannot change when resuming (the run has {flat.get(key)!r}, asked "
                f"{value!r}): the checkpoint continues that training; start a new run instead"
            )
    return data


def stored_state(run_id: str, epoch: int, tracking_uri: str, dst: Path) -> dict[str, Any]:
    """Epoch `epoch`'s stored checkpoint, verified and loaded; a bad one is a `UsageError`."""
    try:
        return load_stored_checkpoint(run_id, epoch, tracking_uri=tracking_uri, dst=dst)[1]
    except CheckpointError as exc:
        raise UsageError(untrusted_hint(exc, run_id)) from None


def prepare_resume(
    target: str,
    epoch: int | None,
    overrides: Mapping[str, Any],
    tracking_uri: str,
    fork: bool = False,
    *,
    trained_ok: bool = False,
    trusted: bool = False,
) -> ResumePoint:
    client = MlflowClient(tracking_uri)
    if target.strip().startswith(MODELS_URI):
        run_id, epoch = model_target(client, target.strip(), epoch, tracking_uri)
    else:
        run_id, epoch = parse_target(target, epoch)
    try:
        finished = client.get_run(run_id).info.status == "FINISHED"
    except MlflowException as exc:
        refusal = server_refusal(exc, tracking_uri, f"to read run {run_id}")
        raise UsageError(refusal or f"run {run_id} not found in {tracking_uri}") from None
    available = stored_epochs(client, run_id)
    if not available:
        raise UsageError(f"run {run_id} has no logged checkpoints to resume from")
    if epoch is None:
        epoch = available[-1]
    elif epoch not in available:
        raise UsageError(
            f"run {run_id} has no checkpoint for epoch {epoch}; "
            f"logged: {', '.join(map(str, available))}"
        )
    data = apply_overrides(logged_config(client, run_id), overrides)
    data.setdefault("tracking", {})["tracking_uri"] = tracking_uri
    # Built from the mapping as is: flattening would split tag keys that hold dots
    # ("sweep.trial") into nested tags.
    config = from_dict(TrainConfig, data)
    validate(config)
    # A run whose process ended after its last epoch's checkpoint, before its evaluation and
    # models (killed, failed, pre-empted, a sweep's taken-over trial: `trained_ok`): the fit
    # restores and ends at once, the rest follows. A finished run is complete, and a fork from
    # a last checkpoint would train nothing.
    if config.trainer.max_epochs <= epoch + 1 and (finished or fork) and not trained_ok:
        raise UsageError(
            f"the checkpoint of epoch {epoch} ends a run of {config.trainer.max_epochs} epochs; "
            f"pass --max-epochs above {epoch + 1} to train longer"
        )
    scratch = Path(tempfile.mkdtemp(prefix="dlharness-resume-"))
    try:
        path = checkpoint_path(
            run_id, epoch, tracking_uri=tracking_uri, dst=scratch, trusted=trusted
        )
    except CheckpointError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UsageError(untrusted_hint(exc, run_id)) from None
    return ResumePoint(run_id, epoch, path, config, fork, scratch, trusted)


def untrusted_hint(exc: CheckpointError, run_id: str) -> str:
    """The refusal in the command's words: the flag that loads a checkpoint the user trusts."""
    if not exc.untrusted:
        return str(exc)
    return f"{exc.fact}; if you trust run {run_id}, resume it with --trust-checkpoint"


def check_same_data(
    client: MlflowClient, run_id: str, datamodule: ClassificationDataModule
) -> None:
    """Refuse to resume on data whose training split differs from the one the run recorded."""
    recorded = {
        tag.value: record.dataset.digest
        for record in client.get_run(run_id).inputs.dataset_inputs
        for tag in record.tags
        if tag.key == MLFLOW_DATASET_CONTEXT
    }
    if "train" not in recorded:
        return
    digest = content_digest(datamodule.splits()["train"])
    if digest != recorded["train"]:
        raise UsageError(
            f"the training data under {datamodule.source} differ from what run {run_id} trained "
            f"on (digest {digest[:12]} != {recorded['train'][:12]}); "
            "point --data-dir at the same data"
        )
