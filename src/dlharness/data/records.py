"""What MLflow records of a data module: a dataset per split (`log_input`) and sample images."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.numpy_dataset import NumpyDataset

from dlharness.data.fingerprint import content_digest
from dlharness.tracking.redaction import redact_uri

if TYPE_CHECKING:
    from dlharness.data.base import ClassificationDataModule


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


def training_samples(
    datamodule: ClassificationDataModule, count: int
) -> tuple[np.ndarray, list[str]]:
    """The first `count` training samples after preprocessing, with their class names."""
    train = datamodule.splits()["train"]
    count = min(count, len(train))
    samples = [sample for sample in (train[i] for i in range(count)) if sample is not None]
    images, labels = zip(*samples, strict=True)
    names = datamodule.info.class_names
    return torch.stack(images).numpy(), [names[int(label)] for label in labels]
