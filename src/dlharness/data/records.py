"""What MLflow records of a data module: a dataset per split (`log_input`) and sample images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.numpy_dataset import NumpyDataset
from torch.utils.data import Dataset

from dlharness.data.fingerprint import content_digest
from dlharness.tracking.redaction import redact_uri


def _source(location: str) -> DatasetSource:
    if not Path(location).exists():
        return CodeDatasetSource(tags={"loader": redact_uri(location)})
    with warnings.catch_warnings():
        # A local path matches MLflow's "local" source under two registered names.
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(Path(location).resolve()))


def split_record(
    subset: Dataset, name: str, location: str, channels: int, size: int
) -> NumpyDataset:
    """Name, source, content digest, and shape (`channels` × `size` × `size` images) of one
    split read from `location`, without copying its samples."""
    shape = (len(subset), channels, size, size)
    # A zero-stride stand-in: MLflow reads the shape and dtype for the record's schema and
    # profile, while the digest comes from the real content.
    features = np.broadcast_to(np.zeros((), dtype=np.float32), shape)
    targets = np.broadcast_to(np.zeros((), dtype=np.int64), (len(subset),))
    return NumpyDataset(
        features=features,
        source=_source(location),
        targets=targets,
        name=name,
        digest=content_digest(subset),
    )


def first_samples(
    split: Dataset, class_names: tuple[str, ...], count: int
) -> tuple[np.ndarray, list[str]]:
    """The first `count` samples of `split` after preprocessing, with their class names."""
    count = min(count, len(split))
    samples = [sample for sample in (split[i] for i in range(count)) if sample is not None]
    images, labels = zip(*samples, strict=True)
    return torch.stack(images).numpy(), [class_names[int(label)] for label in labels]
