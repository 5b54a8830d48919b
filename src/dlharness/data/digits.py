"""scikit-learn's bundled 8×8 handwritten digits: the default data set, no download needed."""

from __future__ import annotations

from functools import cache

import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from dlharness.data.base import ClassificationDataModule, DataInfo, image_transform

# Pixel values in the bundled set are integers 0..16.
_MAX_PIXEL = 16


@cache
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 images as uint8 (N, 1, 8, 8) scaled to 0–255, and their labels.

    Cached and shared by every caller: read only.
    """
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(_MAX_PIXEL).mul(255).round()
    return images.to(torch.uint8).unsqueeze(1), torch.from_numpy(bunch.target).long()


class DigitsDataModule(ClassificationDataModule):
    name = "digits"

    @property
    def info(self) -> DataInfo:
        return DataInfo(
            num_classes=10,
            in_channels=1,
            image_size=self.image_size or 8,
            class_names=tuple(str(d) for d in range(10)),
        )

    @property
    def source(self) -> str:
        return "sklearn.datasets.load_digits"

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        scaled = digit_images()[0].float().div(255)
        return (scaled.mean().item(),), (scaled.std().item(),)

    def load(self) -> tuple[Dataset, None]:
        images, labels = digit_images()
        # 1797 images of 8×8: transforming them all once is cheaper than per sample each epoch.
        transform = image_transform(*self.normalization, self.image_size)
        return TensorDataset(transform(images), labels), None
