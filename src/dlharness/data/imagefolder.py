"""The user's own images: `data.data_dir` holds one sub-folder of images per class."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, default_collate
from torchvision import datasets

from dlharness.data.base import ClassificationDataModule, DataInfo, image_transform
from dlharness.data.image_files import (
    DECODE_ERRORS,
    DecodeFailures,
    unreadable_headers,
    why_unreadable,
)
from dlharness.errors import BadImageError, UsageError

# Files may differ in size, so they are all resized; 32 px suits the small CNN and resnet18 stem.
DEFAULT_IMAGE_SIZE = 32
# Bad files named in the one line that refuses a folder.
NAMED_BAD_FILES = 3


class CheckedImageFolder(datasets.ImageFolder):
    """An ImageFolder whose files that fail to decode stop training with `BadImageError`
    naming the file, or, with `failures`, are recorded there and read as None (a batch then
    leaves them out: `collate_present`)."""

    def __init__(
        self,
        root: str,
        transform: Callable[..., Any],
        is_valid_file: Callable[[str], bool],
        failures: DecodeFailures | None,
    ) -> None:
        super().__init__(root, transform=transform, is_valid_file=is_valid_file)
        self.failures = failures

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except DECODE_ERRORS as exc:
            path, why = self.samples[index][0], why_unreadable(exc)
            if self.failures is None:
                raise BadImageError(f"image file {path} cannot be decoded ({why})") from None
            self.failures.record(path, why)
            return None


def collate_present(samples: list[Any]) -> Any:
    """A batch of the samples that were read (a skipped file's is None)."""
    return default_collate([sample for sample in samples if sample is not None])


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
        # The class list and every file's header, before training; the pixels are read later.
        _ = self.classes
        _ = self.bad_headers

    @cached_property
    def image_files(self) -> list[str]:
        """Every file ImageFolder would read, by its extension."""
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = datasets.folder.make_dataset(
            str(self.data_dir), class_to_idx, extensions=datasets.folder.IMG_EXTENSIONS
        )
        return [path for path, _ in samples]

    @cached_property
    def bad_headers(self) -> list[tuple[str, str]]:
        """(path, why) of the files that are no images by their headers; without
        `skip_bad_images` any such file is a `UsageError` naming the first few."""
        bad = unreadable_headers(self.image_files)
        if bad and not self.skip_bad_images:
            named = "; ".join(f"{path}: {why}" for path, why in bad[:NAMED_BAD_FILES])
            more = f" and {len(bad) - NAMED_BAD_FILES} more" if len(bad) > NAMED_BAD_FILES else ""
            raise UsageError(
                f"image folder {self.data_dir}: {len(bad)} files are not readable images "
                f"({named}{more}); remove them, or pass --skip-bad-images to train on the rest"
            )
        return bad

    @cached_property
    def decode_failures(self) -> DecodeFailures | None:
        """Where files that fail to decode are recorded, with `skip_bad_images`."""
        return DecodeFailures() if self.skip_bad_images else None

    def skipped_while_loading(self) -> list[tuple[str, str]]:
        return self.decode_failures.found() if self.decode_failures is not None else []

    def skipped_images(self) -> list[tuple[str, str]]:
        # The two never share a file: one left out by its header is never loaded.
        return sorted(self.bad_headers + self.skipped_while_loading())

    def collate(self) -> Callable[[list[Any]], Any] | None:
        return collate_present if self.skip_bad_images else None

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Pixel values to -1..1: no statistics of the user's images are needed.
        return (0.5,) * 3, (0.5,) * 3

    def load(self) -> tuple[Dataset, None]:
        transform = image_transform(*self.normalization, self.info.image_size)
        left_out = {path for path, _ in self.bad_headers}
        readable = set(self.image_files) - left_out
        try:
            folder = CheckedImageFolder(
                self.data_dir, transform, readable.__contains__, self.decode_failures
            )
        except FileNotFoundError as exc:
            raise UsageError(f"image folder {self.data_dir}: {exc}") from None
        if len(folder) < 3:
            raise UsageError(
                f"image folder {self.data_dir} has {len(folder)} images; "
                "train/val/test splits need at least 3"
            )
        return folder, None
