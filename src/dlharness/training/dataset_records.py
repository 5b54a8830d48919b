"""Dataset records (`log_input`) for every split, and a look at what the network is fed."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.numpy_dataset import NumpyDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from typing_extensions import override

from dlharness.callbacks.mlflow_tracking import MlflowTracking
from dlharness.data import ClassificationDataModule
from dlharness.data.fingerprint import content_digest
from dlharness.tracking.charts import image_grid
from dlharness.tracking.redaction import redact_uri

SAMPLE_GRID_SIZE = 16
# The files `data.skip_bad_images` left out (path, tab, why), their count, and a metric per
# epoch of those found only while loading.
SKIPPED_IMAGES_FILE = "datasets/skipped_images.txt"
SKIPPED_IMAGES_TAG = "dlharness.skipped_images"
SKIPPED_WHILE_LOADING = "data/skipped_while_loading"


def _source(datamodule: ClassificationDataModule) -> DatasetSource:
    location = datamodule.source
    if not Path(location).exists():
        return CodeDatasetSource(tags={"loader": redact_uri(location)})
    with warnings.catch_warnings():
        # A local path matches MLflow's "local" source under two registered names.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(Path(location).resolve()))


def split_record(datamodule: ClassificationDataModule, split: str) -> NumpyDataset:
    """Name, source, content digest, and shape of one split, without copying its samples."""
    subset = datamodule.splits()[split]
    info = datamodule.info
    shape = (len(subset), info.in_channels, info.image_size, info.image_size)
    # A zero-stride stand-in: MLflow reads the shape and dtype for the record's schema and
    # profile, while the digest comes from the real content.
    features = np.broadcast_to(np.zeros((), dtype=np.float32), shape)
    targets = np.broadcast_to(np.zeros((), dtype=np.int64), (len(subset),))
    return NumpyDataset(
        features=features,
        source=_source(datamodule),
        targets=targets,
        name=f"{datamodule.name}-{split}",
        digest=content_digest(subset),
    )


def log_datasets(
    client: MlflowClient,
    run_id: str,
    datamodule: ClassificationDataModule,
    input_tags: dict[str, str],
) -> None:
    extra = [InputTag(key=key, value=value) for key, value in input_tags.items()]
    inputs = [
        DatasetInput(
            dataset=split_record(datamodule, split)._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=split), *extra],
        )
        for split in ("train", "val", "test")
    ]
    client.log_inputs(run_id, datasets=inputs)


def training_samples(datamodule: ClassificationDataModule) -> tuple[np.ndarray, list[str]]:
    """The first training samples after preprocessing, with their class names."""
    train = datamodule.splits()["train"]
    count = min(SAMPLE_GRID_SIZE, len(train))
    samples = [sample for sample in (train[i] for i in range(count)) if sample is not None]
    images, labels = zip(*samples, strict=True)
    names = datamodule.info.class_names
    return torch.stack(images).numpy(), [names[int(label)] for label in labels]


def log_sample_grid(
    client: MlflowClient, run_id: str, images: np.ndarray, captions: list[str], title: str
) -> None:
    client.log_image(
        run_id, image_grid(images, captions, title), artifact_file="datasets/train_samples.png"
    )


def log_skipped_images(client: MlflowClient, run_id: str, skipped: list[tuple[str, str]]) -> None:
    lines = "".join(f"{path}\t{why}\n" for path, why in skipped)
    client.log_text(run_id, lines, SKIPPED_IMAGES_FILE)
    client.set_tag(run_id, SKIPPED_IMAGES_TAG, str(len(skipped)))


class DatasetRecords(L.Callback):
    """Logs a dataset record per split and a grid of training samples when fitting starts, on
    the tracking thread of `tracking` (global rank 0 only). With `skip_bad_images`, the files
    left out by their headers too, and each epoch how many more were found while loading
    (`SKIPPED_WHILE_LOADING`); the run's end logs the final list (`log_skipped_images`).

    Args:
        tracking: The fit's tracking callback, whose run and thread these records go to.
        input_tags: Tags for every split's record beside its context (the DVC data version).
    """

    def __init__(self, tracking: MlflowTracking, input_tags: dict[str, str] | None = None) -> None:
        self.tracking = tracking
        self.input_tags = dict(input_tags or {})

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not self.tracking.logging or not isinstance(datamodule, ClassificationDataModule):
            return
        client, run_id = self.tracking.client, self.tracking.run.run_id
        self.tracking.submit(
            "dataset records", log_datasets, client, run_id, datamodule, self.input_tags
        )
        # Gathered here: torch work on the tracking thread would slow training down.
        images, captions = training_samples(datamodule)
        title = f"{datamodule.name}: training samples as the network sees them"
        self.tracking.submit(
            "training sample grid", log_sample_grid, client, run_id, images, captions, title
        )
        self._log_skipped(datamodule)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, ClassificationDataModule) and datamodule.skip_bad_images:
            found = float(len(datamodule.skipped_while_loading()))
            pl_module.log(SKIPPED_WHILE_LOADING, found, on_epoch=True, rank_zero_only=True)

    def _log_skipped(self, datamodule: ClassificationDataModule) -> None:
        if not datamodule.skip_bad_images:
            return
        client, run_id = self.tracking.client, self.tracking.run.run_id
        skipped = datamodule.skipped_images()
        self.tracking.submit("skipped images", log_skipped_images, client, run_id, skipped)
