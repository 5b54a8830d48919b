"""DataModules, one per data source, by name."""

from __future__ import annotations

from dlharness.data.base import ClassificationDataModule, DataInfo
from dlharness.data.digits import DigitsDataModule
from dlharness.data.imagefolder import ImageFolderDataModule
from dlharness.data.torchvision_sets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)

DATAMODULES: dict[str, type[ClassificationDataModule]] = {
    module.name: module
    for module in (
        DigitsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        ImageFolderDataModule,
    )
}

__all__ = ["DATAMODULES", "ClassificationDataModule", "DataInfo"]
