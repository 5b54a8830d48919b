"""DataModules, one per data source, chosen by `data.dataset`."""

from __future__ import annotations

from dlharness.config import DataConfig
from dlharness.data.base import ClassificationDataModule, DataInfo
from dlharness.data.digits import DigitsDataModule
from dlharness.data.imagefolder import ImageFolderDataModule
from dlharness.data.torchvision_sets import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)

DATAMODULES: dict[str, type[ClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "imagefolder": ImageFolderDataModule,
}


def build_datamodule(cfg: DataConfig, seed: int) -> ClassificationDataModule:
    return DATAMODULES[cfg.dataset](cfg, seed)


__all__ = ["DATAMODULES", "ClassificationDataModule", "DataInfo", "build_datamodule"]
