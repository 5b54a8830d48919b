"""Each stored checkpoint as an MLflow 3 LoggedModel of its run: created with its file, the
epoch's metrics linked to it and to the datasets they were computed on, deleted with its file.

The experiment's Models tab then lists one row per kept checkpoint, with a column per metric
and dataset; ``models:/<model_id>`` names a checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from dlharness.tracking.epoch_history import metric_batches
from dlharness.tracking.spool import Spool, SpoolingClient

MODEL_TYPE = "checkpoint"
EPOCH_TAG = "dlharness.epoch"
GLOBAL_STEP_TAG = "dlharness.global_step"
SHA256_TAG = "dlharness.sha256"
MONITOR_TAG = "dlharness.monitor"
MONITOR_VALUE_TAG = "dlharness.monitor_value"
# "true" on the run's latest and on its best checkpoint, removed once another one is.
LATEST_TAG = "dlharness.latest"
BEST_TAG = "dlharness.best"
MODELS_URI = "models:/"
# The spooled operations: a checkpoint's model created, and deleted, once the server answers.
CHECKPOINT_MODEL_OP = "checkpoint_model"
DELETE_CHECKPOINT_MODEL_OP = "delete_checkpoint_model"

# (name, digest) of a dataset, by the context the run logged it with (train, val, test).
Datasets = dict[str, tuple[str, str]]


def model_name(run_name: str, epoch: int) -> str:
    return f"{run_name}-epoch-{epoch}"


def run_datasets(client: MlflowClient, run_id: str) -> Datasets:
    """The run's dataset inputs by context, as `log_input(dataset, context=...)` logged them."""
    found: Datasets = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        context = next((t.value for t in item.tags if t.key == MLFLOW_DATASET_CONTEXT), None)
        if context is not None:
            found[context] = (item.dataset.name, item.dataset.digest)
    return found


def linked(metrics: Sequence[Metric], model_id: str, datasets: Datasets) -> list[Metric]:
    """`metrics` carrying `model_id`, and the dataset of their stage (``val/acc`` or
    ``val_acc`` → ``val``) where the run logged one with that context."""
    out = []
    for metric in metrics:
        stage = re.split(r"[/_]", metric.key, maxsplit=1)[0]
        name, digest = datasets.get(stage, (None, None))
        out.append(
            Metric(
                metric.key,
                metric.value,
                metric.timestamp,
                metric.step,
                model_id=model_id,
                dataset_name=name,
                dataset_digest=digest,
            )
        )
    return out


def create_checkpoint_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    name: str,
    folder: Path,
    params: Mapping[str, str],
    tags: Mapping[str, str],
) -> str:
    """A LoggedModel of run `run_id` whose artifacts are the files of `folder` (the checkpoint
    and its record): READY once they are uploaded, FAILED (and the error raised) if not."""
    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=run_id,
        params=dict(params),
        tags=dict(tags),
        model_type=MODEL_TYPE,
    )
    try:
        client.log_model_artifacts(model.model_id, str(folder))
    except Exception:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def record_output(client: MlflowClient, run_id: str, model_id: str, epoch: int) -> None:
    """The model as one of the run's outputs at ``step = epoch``."""
    client.log_outputs(run_id, [LoggedModelOutput(model_id, epoch)])


def checkpoint_models(
    client: MlflowClient, experiment_id: str, run_id: str
) -> dict[int, LoggedModel]:
    """The run's checkpoint models by epoch (a resumed fit replaces, never duplicates, them)."""
    found: dict[int, LoggedModel] = {}
    token = None
    while True:
        page = client.search_logged_models(
            [experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            page_token=token,
        )
        for model in page:
            epoch = model.tags.get(EPOCH_TAG)
            if model.model_type == MODEL_TYPE and epoch is not None and epoch.isdigit():
                found[int(epoch)] = model
        token = page.token
        if not token:
            return found


def move_role(
    client: MlflowClient, tag: str, old: str | None, new: str | None, tagged: bool = False
) -> None:
    """Tag `new` with `tag` (unless it was `tagged` when created) and take it off `old`
    (latest or best changes hands)."""
    if old == new:
        return
    if new is not None and not tagged:
        client.set_logged_model_tags(new, {tag: "true"})
    if old is not None:
        with contextlib.suppress(Exception):  # deleted with its checkpoint
            client.delete_logged_model_tag(old, tag)


def model_checkpoint(client: MlflowClient, uri: str) -> tuple[str, int]:
    """(run id, epoch) of the checkpoint that ``models:/<model_id>`` names."""
    model_id = uri[len(MODELS_URI) :].strip("/")
    model = client.get_logged_model(model_id)
    epoch = model.tags.get(EPOCH_TAG)
    if model.model_type != MODEL_TYPE or epoch is None or not model.source_run_id:
        raise ValueError(f"{uri} is no checkpoint of a run (model type {model.model_type!r})")
    return model.source_run_id, int(epoch)


class CheckpointModels:
    """The LoggedModels of one run's checkpoints, kept on the tracking thread: which epoch is
    which model, which is latest and best, and the datasets the run's metrics link to.

    Args:
        client: The run's client.
        run_id: The run the checkpoints belong to.
        joined: The run existed before this fit: its models are read back, so that an epoch
            stored again replaces its model rather than adding one.
    """

    def __init__(self, client: MlflowClient, run_id: str, joined: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.by_epoch: dict[int, str] = {}
        self._joined = joined
        self._experiment_id: str | None = None
        self._run_name = ""
        self._datasets: Datasets = {}
        self._latest: str | None = None
        self._best: str | None = None
        self._stale = False

    def stale(self) -> None:
        """Models were spooled: read them back from the store before the next change."""
        self._stale = self._joined = True

    def _read_run(self) -> None:
        if self._experiment_id is not None and not self._stale:
            return
        self._stale = False
        run = self.client.get_run(self.run_id)
        self._experiment_id, self._run_name = run.info.experiment_id, run.info.run_name
        if self._joined:
            models = checkpoint_models(self.client, self._experiment_id, self.run_id)
            self.by_epoch = {epoch: model.model_id for epoch, model in models.items()}
            self._latest = self._best = None
            for model in models.values():
                self._latest = model.model_id if LATEST_TAG in model.tags else self._latest
                self._best = model.model_id if BEST_TAG in model.tags else self._best

    def create(
        self,
        epoch: int,
        folder: Path,
        record: Mapping[str, object],
        params: Mapping[str, str],
        monitor: str | None,
        best_epoch: int | None,
    ) -> str:
        """The model of epoch `epoch`'s checkpoint, whose files are in `folder`, created as the
        latest (and the best, if `best_epoch` is `epoch`: two writes fewer than tagging it
        after); one stored before for the same epoch (an interrupted epoch, a resume from an
        earlier one) goes."""
        self._read_run()
        if not self._datasets:  # logged when fitting started, or never (a BoringModel)
            self._datasets = run_datasets(self.client, self.run_id)
        self.delete(epoch)
        tags = {
            EPOCH_TAG: str(epoch),
            GLOBAL_STEP_TAG: str(record.get("global_step", "")),
            SHA256_TAG: str(record.get("sha256", "")),
            LATEST_TAG: "true",
        }
        if best_epoch == epoch:
            tags[BEST_TAG] = "true"
        if monitor is not None and monitor in record:
            tags |= {MONITOR_TAG: monitor, MONITOR_VALUE_TAG: str(record[monitor])}
        name = model_name(self._run_name, epoch)
        model_id = create_checkpoint_model(
            self.client, self._experiment_id, self.run_id, name, folder, params, tags
        )
        self.by_epoch[epoch] = model_id
        return model_id

    def link(self, metrics: Sequence[Metric], model_id: str) -> list[Metric]:
        return linked(metrics, model_id, self._datasets)

    def stored(self, epoch: int, best_epoch: int | None) -> None:
        """Epoch `epoch`'s checkpoint is the run's latest: its model joins the run's outputs,
        the latest tag leaves the model before, and the best tag moves to `best_epoch`'s."""
        model_id = self.by_epoch[epoch]
        record_output(self.client, self.run_id, model_id, epoch)
        move_role(self.client, LATEST_TAG, self._latest, model_id, tagged=True)
        self._latest = model_id
        best = self.by_epoch.get(best_epoch) if best_epoch is not None else None
        move_role(self.client, BEST_TAG, self._best, best, tagged=best_epoch == epoch)
        self._best = best

    def delete(self, epoch: int) -> None:
        """Delete epoch `epoch`'s model, if it has one (its checkpoint is gone or replaced)."""
        self._read_run()
        model_id = self.by_epoch.pop(epoch, None)
        if model_id is None:
            return
        self.client.delete_logged_model(model_id)
        self._latest = None if self._latest == model_id else self._latest
        self._best = None if self._best == model_id else self._best


def spool_checkpoint_model(
    client: SpoolingClient,
    epoch: int,
    folder: Path,
    record: Mapping[str, object],
    params: Mapping[str, str],
    monitor: str | None,
    metrics: Sequence[Metric],
    best_epoch: int | None,
) -> None:
    """Epoch `epoch`'s model, its linked `metrics` and tags, made once the server answers (by
    this process while it trains, else by ``dlharness-sync``)."""
    client.spool_operation(
        CHECKPOINT_MODEL_OP,
        files={"checkpoint": folder},
        replayer=replay_checkpoint_model,
        epoch=epoch,
        record=dict(record),
        params=dict(params),
        monitor=monitor,
        metrics=[[m.key, m.value, m.timestamp, m.step] for m in metrics],
        best_epoch=best_epoch,
    )


def spool_model_deletion(client: SpoolingClient, epoch: int) -> None:
    client.spool_operation(
        DELETE_CHECKPOINT_MODEL_OP, files={}, replayer=replay_model_deletion, epoch=epoch
    )


def replay_checkpoint_model(tracking_uri: str, spool: Spool, entry: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri)
    models = CheckpointModels(client, spool.run_id, joined=True)
    epoch = entry["epoch"]
    folder = spool.file(entry, "checkpoint")
    model_id = models.create(
        epoch, folder, entry["record"], entry["params"], entry["monitor"], entry["best_epoch"]
    )
    # A replay run again after a partial one sends only what the run does not hold yet.
    held = {
        key: {m.step for m in client.get_metric_history(spool.run_id, key)}
        for key in {key for key, *_ in entry["metrics"]}
    }
    metrics = [
        Metric(key, value, timestamp, step)
        for key, value, timestamp, step in entry["metrics"]
        if step not in held[key]
    ]
    for batch in metric_batches(models.link(metrics, model_id)):
        client.log_batch(spool.run_id, metrics=batch)
    models.stored(epoch, entry["best_epoch"])


def replay_model_deletion(tracking_uri: str, spool: Spool, entry: dict[str, Any]) -> None:
    CheckpointModels(MlflowClient(tracking_uri), spool.run_id, joined=True).delete(entry["epoch"])


# What `dlharness-sync` and the live catch-up replay, by operation.
MODEL_REPLAYERS = {
    CHECKPOINT_MODEL_OP: replay_checkpoint_model,
    DELETE_CHECKPOINT_MODEL_OP: replay_model_deletion,
}
