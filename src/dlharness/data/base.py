"""What every image-classification DataModule shares: seeded splits, loaders and shape facts."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision.transforms import v2

from dlharness.config import DataConfig


@dataclass(frozen=True)
class DataInfo:
    """Shape facts a network is sized from, known before any file is read."""

    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]


def image_transform(
    mean: tuple[float, ...], std: tuple[float, ...], size: int | None
) -> v2.Compose:
    """PIL image / uint8 tensor → normalised float32 tensor, resized to a square if asked."""
    steps: list[Any] = [v2.ToImage()]
    if size is not None:
        steps.append(v2.Resize((size, size), antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class ClassificationDataModule(L.LightningDataModule):
    """Seeded train/val/test splits of one labelled image set.

    Subclasses say what the data is (`info`), where it comes from (`prepare_data`) and how to
    read it (`load`); this class splits it with a generator seeded from the run's seed, so the
    same seed always gives the same split, and `setup` may be called any number of times.
    The shuffling generator's state is part of `state_dict`, so a resumed run sees the same
    batch order as an uninterrupted one.
    """

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.shuffle_generator = torch.Generator().manual_seed(seed)

    @property
    @abstractmethod
    def info(self) -> DataInfo: ...

    @abstractmethod
    def load(self) -> tuple[Dataset, Dataset | None]:
        """Return (pool, fixed_test): fixed_test is None when the test split comes from the pool."""

    @property
    def source(self) -> str:
        """Where the data comes from, for the run's dataset records."""
        return self.cfg.data_dir

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pool, fixed_test = self.load()
        split_generator = torch.Generator().manual_seed(self.seed)
        n = len(pool)
        n_val = max(1, round(n * self.cfg.val_fraction))
        if fixed_test is None:
            n_test = max(1, round(n * self.cfg.test_fraction))
            n_train = n - n_val - n_test
            self.train_set, self.val_set, self.test_set = random_split(
                pool, [n_train, n_val, n_test], generator=split_generator
            )
        else:
            self.train_set, self.val_set = random_split(
                pool, [n - n_val, n_val], generator=split_generator
            )
            self.test_set = fixed_test

    def splits(self) -> dict[str, Dataset]:
        self.setup()
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits().items()}

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=self.shuffle_generator if shuffle else None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_generator": self.shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shuffle_generator.set_state(state_dict["shuffle_generator"])
