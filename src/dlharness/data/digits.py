"""scikit-learn's bundled 8×8 handwritten digits: the default data set, no download needed."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, TensorDataset

from dlharness.data.base import ClassificationDataModule, DataInfo, image_transform

# Pixel values in the bundled set are integers 0..16.
_MAX_PIXEL = 16


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

    def load(self) -> tuple[Dataset, None]:
        bunch = load_digits()
        images = torch.from_numpy(bunch.images).float().div(_MAX_PIXEL).mul(255).round()
        images = images.to(torch.uint8).unsqueeze(1)
        mean = images.float().div(255).mean().item()
        std = images.float().div(255).std().item()
        # 1797 images of 8×8: transforming them all once is cheaper than per sample each epoch.
        transform = image_transform((mean,), (std,), self.image_size)
        features = transform(images)
        return TensorDataset(features, torch.from_numpy(bunch.target).long()), None
