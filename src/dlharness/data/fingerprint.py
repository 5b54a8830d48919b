"""Content digests of data splits: the raw bytes of every sample and label, in split order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import singledispatch
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets


@singledispatch
def sample_bytes(dataset: Dataset, indices: Sequence[int]) -> Iterator[bytes]:
    raise TypeError(f"no content digest for {type(dataset).__name__}")


def raw_rows(indices: Sequence[int], *tensors: torch.Tensor) -> Iterator[bytes]:
    # numpy indexing on purpose: a torch op on this (tracking) thread would start a second
    # OpenMP thread team that keeps competing with training for the cores.
    index = np.asarray(indices, dtype=np.int64)
    for tensor in tensors:
        yield np.ascontiguousarray(tensor.numpy()[index]).tobytes()


@sample_bytes.register
def _(dataset: TensorDataset, indices: Sequence[int]) -> Iterator[bytes]:
    yield from raw_rows(indices, *dataset.tensors)


@sample_bytes.register
def _(dataset: datasets.MNIST, indices: Sequence[int]) -> Iterator[bytes]:
    yield from raw_rows(indices, dataset.data, dataset.targets)


@sample_bytes.register
def _(dataset: datasets.ImageFolder, indices: Sequence[int]) -> Iterator[bytes]:
    for i in indices:
        path, label = dataset.samples[i]
        yield Path(path).read_bytes() + label.to_bytes(4, "little")


def content_digest(split: Dataset) -> str:
    """sha256 (first 32 hex digits) over a split's raw samples and labels."""
    if isinstance(split, Subset):
        base, indices = split.dataset, split.indices
    else:
        base, indices = split, range(len(split))
    digest = hashlib.sha256()
    for chunk in sample_bytes(base, indices):
        digest.update(chunk)
    return digest.hexdigest()[:32]
