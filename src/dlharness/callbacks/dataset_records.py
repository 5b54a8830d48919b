"""Dataset records (`log_input`) for every split, and a look at what the network is fed."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import lightning as L
import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from typing_extensions import override

from dlharness.callbacks.mlflow_tracking import MlflowTracking
from dlharness.tracking.pictures.charts import image_grid

SAMPLE_GRID_SIZE = 16
# The files `skip_bad_images` left out (path, tab, why), their count, and a metric per epoch of
# those found only while loading.
SKIPPED_IMAGES_FILE = "datasets/skipped_images.txt"
SKIPPED_IMAGES_TAG = "dlharness.skipped_images"
SKIPPED_WHILE_LOADING = "data/skipped_while_loading"


@runtime_checkable
class RecordedData(Protocol):
    """A data module that describes its splits to MLflow (the harness's data modules do)."""

    skip_bad_images: bool

    def dataset_records(self) -> dict[str, Dataset]: ...

    def sample_images(self, count: int) -> tuple[np.ndarray, list[str], str]: ...

    def skipped_images(self) -> list[tuple[str, str]]: ...

    def skipped_while_loading(self) -> list[tuple[str, str]]: ...


def log_datasets(
    client: MlflowClient, run_id: str, records: dict[str, Dataset], input_tags: dict[str, str]
) -> None:
    extra = [InputTag(key=key, value=value) for key, value in input_tags.items()]
    inputs = [
        DatasetInput(
            dataset=record._to_mlflow_entity(),
            tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=split), *extra],
        )
        for split, record in records.items()
    ]
    client.log_inputs(run_id, datasets=inputs)


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
    the tracking thread of `tracking` (global rank 0 only), for a data module that is
    `RecordedData`. With `skip_bad_images`, the files left out by their headers too, and each
    epoch how many more were found while loading (`SKIPPED_WHILE_LOADING`); the run's end logs
    the final list (`log_skipped_images`).

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
        if not self.tracking.logging or not isinstance(datamodule, RecordedData):
            return
        client, run_id = self.tracking.client, self.tracking.run.run_id
        records = datamodule.dataset_records()
        self.tracking.submit(
            "dataset records", log_datasets, client, run_id, records, self.input_tags
        )
        # Gathered here: torch work on the tracking thread would slow training down.
        images, captions, title = datamodule.sample_images(SAMPLE_GRID_SIZE)
        self.tracking.submit(
            "training sample grid", log_sample_grid, client, run_id, images, captions, title
        )
        if datamodule.skip_bad_images:
            skipped = datamodule.skipped_images()
            self.tracking.submit("skipped images", log_skipped_images, client, run_id, skipped)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, RecordedData) and datamodule.skip_bad_images:
            found = float(len(datamodule.skipped_while_loading()))
            pl_module.log(SKIPPED_WHILE_LOADING, found, on_epoch=True, rank_zero_only=True)
