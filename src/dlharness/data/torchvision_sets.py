"""MNIST, Fashion-MNIST and CIFAR-10 in torchvision's on-disk layout under `data.data_dir`.

Files are downloaded only in `prepare_data` and only with `data.download` on; otherwise missing
files are a one-line error naming the folder they were expected in.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets

from dlharness.data.base import ClassificationDataModule, DataInfo, image_transform
from dlharness.data.fingerprint import raw_rows, sample_bytes
from dlharness.errors import UsageError, first_line


class _TorchvisionDataModule(ClassificationDataModule):
    """A torchvision data set with a fixed official test split."""

    dataset_cls: ClassVar[type]
    in_channels: ClassVar[int]
    native_size: ClassVar[int]
    class_names: ClassVar[tuple[str, ...]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]

    @property
    def info(self) -> DataInfo:
        return DataInfo(
            num_classes=len(self.class_names),
            in_channels=self.in_channels,
            image_size=self.image_size or self.native_size,
            class_names=self.class_names,
        )

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    @property
    def files_dir(self) -> Path:
        """The folder torchvision keeps this data set's files in."""
        raise NotImplementedError

    @property
    def required_files(self) -> tuple[str, ...]:
        raise NotImplementedError

    def missing_files(self) -> list[str]:
        return [name for name in self.required_files if not (self.files_dir / name).is_file()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if not missing:
            return
        if not self.download:
            raise UsageError(
                f"{self.name} files not found in {self.files_dir} (missing {missing[0]}); "
                "pass --download to fetch them, or --data-dir to point at them"
            )
        try:
            for train in (True, False):
                self.dataset_cls(str(self.root), train=train, download=True)
        except Exception as exc:
            raise UsageError(
                f"downloading {self.name} into {self.files_dir} failed ({exc}); "
                "place the files there by hand or check the network"
            ) from None

    @property
    def source(self) -> str:
        return str(self.files_dir.resolve())

    def transform(self) -> Any:
        return image_transform(self.mean, self.std, self.image_size)


class MNISTDataModule(_TorchvisionDataModule):
    dataset_cls = datasets.MNIST
    name = "mnist"
    in_channels = 1
    native_size = 28
    class_names = tuple(str(d) for d in range(10))
    mean, std = (0.1307,), (0.3081,)

    @property
    def files_dir(self) -> Path:
        return self.root / self.dataset_cls.__name__ / "raw"

    @property
    def required_files(self) -> tuple[str, ...]:
        # torchvision reads the uncompressed idx files it extracts from the .gz downloads.
        return tuple(Path(url).stem for url, _ in self.dataset_cls.resources)

    def load(self) -> tuple[Dataset, Dataset]:
        self.prepare_data()
        make = self.dataset_cls
        transform = self.transform()
        try:
            return (
                make(str(self.root), train=True, transform=transform),
                make(str(self.root), train=False, transform=transform),
            )
        except Exception as exc:  # torchvision's idx reader on a file cut short or altered
            raise UsageError(
                f"cannot read the {self.name} files in {self.files_dir} ({first_line(exc)}): they "
                "are damaged; delete them and download again (--download)"
            ) from None


class FashionMNISTDataModule(MNISTDataModule):
    dataset_cls = datasets.FashionMNIST
    name = "fashion_mnist"
    class_names = tuple(datasets.FashionMNIST.classes)
    mean, std = (0.2860,), (0.3530,)


class InMemoryImages(Dataset):
    """uint8 images (N, C, H, W) with integer labels, transformed per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


@sample_bytes.register
def _(dataset: InMemoryImages, indices: Sequence[int]) -> Iterator[bytes]:
    yield from raw_rows(indices, dataset.images, dataset.labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's pickled batches while refusing any object but plain numpy arrays.

    The batches are pickles; a tampered file could otherwise run code when loaded.
    """

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes in protocol 2 as _codecs.encode(text, "latin1"): a pure function.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"cannot read CIFAR-10 batch {path}: {exc}") from None


class CIFAR10DataModule(_TorchvisionDataModule):
    dataset_cls = datasets.CIFAR10
    name = "cifar10"
    # resnet18 on CIFAR-10 plateaus far lower without random crops and flips.
    default_augment = "crop_flip"
    in_channels = 3
    native_size = 32
    class_names = (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    )  # fmt: skip
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train_batches = tuple(f"data_batch_{i}" for i in range(1, 6))

    @property
    def files_dir(self) -> Path:
        return self.root / self.dataset_cls.base_folder

    @property
    def required_files(self) -> tuple[str, ...]:
        return (*self.train_batches, "test_batch")

    def _read(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [read_cifar_batch(self.files_dir / name) for name in names]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        # Rows are 3072 bytes: the 32×32 red plane, then green, then blue.
        return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)

    def load(self) -> tuple[Dataset, Dataset]:
        self.prepare_data()
        transform = self.transform()
        return (
            InMemoryImages(*self._read(self.train_batches), transform),
            InMemoryImages(*self._read(("test_batch",)), transform),
        )
