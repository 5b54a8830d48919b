"""The user's own images: `data.data_dir` holds one sub-folder of images per class."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import datasets

from dlharness.data.base import ClassificationDataModule, DataInfo, image_transform
from dlharness.errors import UsageError

# Files may differ in size, so they are all resized; 32 px suits the small CNN and resnet18 stem.
DEFAULT_IMAGE_SIZE = 32


class ImageFolderDataModule(ClassificationDataModule):
    name = "imagefolder"

    @cached_property
    def classes(self) -> tuple[str, ...]:
        root = Path(self.data_dir)
        if not root.is_dir():
            raise UsageError(
                f"image folder {root} does not exist; pass --data-dir with one sub-folder per class"
            )
        try:
            classes, _ = datasets.folder.find_classes(str(root))
        except FileNotFoundError:
            raise UsageError(
                f"image folder {root} has no class sub-folders; "
                "put each class's images in a folder of its own"
            ) from None
        if len(classes) < 2:
            raise UsageError(f"image folder {root} needs at least 2 class folders, found {classes}")
        return tuple(classes)

    @property
    def info(self) -> DataInfo:
        return DataInfo(
            num_classes=len(self.classes),
            in_channels=3,
            image_size=self.image_size or DEFAULT_IMAGE_SIZE,
            class_names=self.classes,
        )

    @property
    def source(self) -> str:
        return str(Path(self.data_dir).resolve())

    def prepare_data(self) -> None:
        # Reading the class list checks the folder; the images themselves are read in `load`.
        _ = self.classes

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Pixel values to -1..1: no statistics of the user's images are needed.
        return (0.5,) * 3, (0.5,) * 3

    def load(self) -> tuple[Dataset, None]:
        transform = image_transform(*self.normalization, self.info.image_size)
        try:
            folder = datasets.ImageFolder(self.data_dir, transform=transform)
        except FileNotFoundError as exc:
            raise UsageError(f"image folder {self.data_dir}: {exc}") from None
        if len(folder) < 3:
            raise UsageError(
                f"image folder {self.data_dir} has {len(folder)} images; "
                "train/val/test splits need at least 3"
            )
        return folder, None
