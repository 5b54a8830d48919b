"""The served-ready classifier of any stored checkpoint, not only the run's best: logged into
the checkpoint's run (``classifier-epoch-N``) and registered if asked."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dlharness.errors import UsageError, first_line
from dlharness.models.nets import build_net
from dlharness.serving.classifier_logging import ImagePreprocessing
from dlharness.serving.model_logging import ServedClasses, log_served_classifier, register_candidate
from dlharness.tracking.checkpointing.artifacts import (
    CheckpointError,
    load_stored_checkpoint,
    stored_epochs,
)
from dlharness.tracking.checkpointing.logged_models import MODELS_URI, model_checkpoint

# The name the run's own classifier (from its best checkpoint) is logged under.
RUN_CLASSIFIER = "classifier"


@dataclass(frozen=True)
class CheckpointClassifier:
    run_id: str
    epoch: int
    model_uri: str
    registered_version: str | None


def served_classes(client: MlflowClient, run_id: str) -> ServedClasses:
    """Class names and preprocessing, from the classifier the run logged when it finished."""
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{RUN_CLASSIFIER}'",
        max_results=1,
    )
    if not found:
        raise UsageError(
            f"run {run_id} has no '{RUN_CLASSIFIER}' model to take class names and "
            "preprocessing from: it logs one when its training finishes"
        )
    with tempfile.TemporaryDirectory(prefix="dlharness-spec-") as scratch:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{found[0].artifact_location}/artifacts/spec.json", dst_path=scratch
        )
        spec = json.loads(Path(path).read_text())
    names = tuple(spec.pop("class_names"))
    spec.pop("net")
    spec["mean"], spec["std"] = tuple(spec["mean"]), tuple(spec["std"])
    return ServedClasses(names, ImagePreprocessing(**spec))


def log_checkpoint_classifier(
    target: str, epoch: int | None, tracking_uri: str, register: str | None = None
) -> CheckpointClassifier:
    """Log the classifier of a stored checkpoint into its run, and register it under
    `register` (alias ``candidate``).

    Args:
        target: ``models:/<model_id>`` of a checkpoint, or a run id (with `epoch`, else its
            latest checkpoint).
        epoch: The run's epoch; None with a run id: the latest stored.
        tracking_uri: The store of the run.
        register: A registered-model name, or None.
    """
    client = MlflowClient(tracking_uri)
    try:
        if target.startswith(MODELS_URI):
            if epoch is not None:
                raise UsageError(f"{target} names one checkpoint: give no epoch")
            run_id, epoch = model_checkpoint(client, target)
        else:
            run_id = target
            if epoch is None:
                epoch = max(stored_epochs(client, run_id), default=None)
                if epoch is None:
                    raise UsageError(f"run {run_id} has no stored checkpoints")
        served = served_classes(client, run_id)
        status = client.get_run(run_id).info.status
        with tempfile.TemporaryDirectory(prefix="dlharness-checkpoint-") as scratch:
            _, state = load_stored_checkpoint(run_id, epoch, tracking_uri=tracking_uri, dst=scratch)
    except (MlflowException, ValueError, CheckpointError) as exc:
        raise UsageError(first_line(exc)) from None
    net_spec = state.get("hyper_parameters", {}).get("net_spec")
    if net_spec is None:
        raise UsageError(
            f"epoch {epoch} of run {run_id} is no checkpoint of dlharness's classifier"
        )
    net = build_net(net_spec)
    prefix = "net."
    net.load_state_dict(
        {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    )
    example = torch.zeros(2, served.preprocessing.channels, *(served.preprocessing.image_size,) * 2)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = log_served_classifier(
                net, net_spec, served, example, name=f"{RUN_CLASSIFIER}-epoch-{epoch}"
            )
        # Reopening the run marked it RUNNING, and its end FINISHED: it keeps its own status.
        client.set_terminated(run_id, status)
        version = register_candidate(info.model_uri, register) if register else None
    finally:
        mlflow.set_tracking_uri(previous)
    return CheckpointClassifier(run_id, epoch, info.model_uri, version)
