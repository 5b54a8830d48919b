"""What every image-classification DataModule shares: seeded splits, loaders and shape facts."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from mlflow.data.numpy_dataset import NumpyDataset
from torch.utils.data import DataLoader, Dataset, Sampler, random_split
from torchvision.transforms import v2

from dlharness.data.augmentation import AUGMENTATIONS, DRAW_RANGE, AugmentedSplit, crop_flip
from dlharness.data.records import first_samples, split_record


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


class TensorBatches(Dataset):
    """A whole split as two tensors, where a batch is one indexing op (`data.on_device`).

    Its loader's `collate_fn` is `batch_as_is`: `__getitems__` already returns the batch. A
    sampler of ``(index, draw)`` pairs gets the batch augmented on the device (`crop_flip`).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def __getitems__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        if items and isinstance(items[0], tuple):
            indices, draws = zip(*items, strict=True)
            index = torch.tensor(indices, device=self.labels.device)
            return crop_flip(self.features[index], torch.tensor(draws)), self.labels[index]
        index = torch.tensor(items, device=self.labels.device)
        return self.features[index], self.labels[index]


def batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def stack_split(
    dataset: Dataset, num_workers: int, device: torch.device, collate_fn: Any = None
) -> TensorBatches:
    """Read and transform every sample of `dataset` once, into tensors on `device`."""
    # 1024 samples per read: few Python round trips, bounded host memory per step. A loader
    # without a generator draws its seed from the global one, shifting later dropout draws.
    loader = DataLoader(
        dataset,
        batch_size=1024,
        num_workers=num_workers,
        generator=torch.Generator(),
        collate_fn=collate_fn,
    )
    features, labels = zip(*loader, strict=True)
    return TensorBatches(torch.cat(features).to(device), torch.cat(labels).to(device))


class ResumableRandomSampler(Sampler):
    """A random order per pass from one seeded generator, that can resume mid-pass.

    `epoch_state` is the generator's state just before the current pass drew its order;
    `resume(state, skip)` makes the next pass draw that same order again and leave out its
    first `skip` indices, so a run stopped after k batches continues with batch k + 1. With
    `draws`, each index comes paired with a number drawn after the order, which decides the
    sample's augmentation: a resumed pass redraws the same ones.
    """

    def __init__(self, size: int, generator: torch.Generator, draws: bool = False) -> None:
        self.size = size
        self.generator = generator
        self.draws = draws
        self.epoch_state: torch.Tensor | None = None
        self._resume: tuple[torch.Tensor, int] | None = None

    def __len__(self) -> int:
        return self.size

    def resume(self, epoch_state: torch.Tensor, skip: int) -> None:
        self._resume = (epoch_state, skip)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
        self.epoch_state = self.generator.get_state()
        order = torch.randperm(self.size, generator=self.generator).tolist()
        if not self.draws:
            yield from order[skip:]
            return
        draws = torch.randint(DRAW_RANGE, (self.size,), generator=self.generator).tolist()
        yield from list(zip(order, draws, strict=True))[skip:]


class ClassificationDataModule(L.LightningDataModule):
    """Seeded train/val/test splits of one labelled image set.

    Subclasses say what the data is (`info`), where it comes from (`prepare_data`) and how to
    read it (`load`); this class splits it with a generator seeded from the run's seed, so the
    same seed always gives the same split, and `setup` may be called any number of times.
    The shuffling generator's state, and the position inside an interrupted epoch, are part
    of `state_dict`, so a resumed run sees the same batches in the same order as an
    uninterrupted one.

    Args:
        data_dir: Root of the files (torchvision sets live in sub-folders), or the image folder.
        batch_size: Samples per batch.
        num_workers: Data-loader worker processes.
        val_fraction: Share of the whole set for validation (of the official training split
            for sets with a fixed test split).
        test_fraction: Share of the whole set for testing; unused with a fixed test split.
        image_size: Square side in pixels images are resized to; None keeps the set's own.
        on_device: Hold every split as two tensors on the training device (read and
            transformed once): a batch is then one indexing op.
        download: Whether `prepare_data` may download missing files.
        seed: Seeds the split and the shuffling.
        augment: ``none``, or ``crop_flip`` for the training split: random crops after
            padding and horizontal flips, reproduced by the seed and by an exact resume.
        skip_bad_images: Leave out files that cannot be read as images instead of refusing
            them (sets read from files one by one: the image folder).
    """

    name: ClassVar[str]
    # What `augment` a harness run gets unless its config says.
    default_augment: ClassVar[str] = "none"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_size: int | None = None,
        on_device: bool = False,
        download: bool = False,
        seed: int = 42,
        augment: str = "none",
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.image_size = image_size
        self.on_device = on_device
        self.download = download
        self.seed = seed
        self.augment = augment
        self.skip_bad_images = skip_bad_images
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.train_sampler: ResumableRandomSampler | None = None
        # Where `data.on_device` puts the splits when no trainer says (the bench's plain loop).
        self.device_without_trainer = torch.device("cpu")
        self._stacked: dict[tuple[str, torch.device], TensorBatches] = {}

    @property
    @abstractmethod
    def info(self) -> DataInfo: ...

    @property
    @abstractmethod
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel, of pixel values scaled to 0–1, as `load`'s transform uses."""

    @abstractmethod
    def load(self) -> tuple[Dataset, Dataset | None]:
        """Return (pool, fixed_test): fixed_test is None when the test split comes from the pool."""

    @property
    def source(self) -> str:
        """Where the data comes from, for the run's dataset records."""
        return self.data_dir

    def collate(self) -> Any:
        """The loaders' `collate_fn`; None: PyTorch's default."""
        return None

    def dataset_records(self) -> dict[str, NumpyDataset]:
        """MLflow's record (name, source, content digest, shape) of each split, by split."""
        info = self.info
        return {
            split: split_record(
                subset, f"{self.name}-{split}", self.source, info.in_channels, info.image_size
            )
            for split, subset in self.splits().items()
        }

    def sample_images(self, count: int) -> tuple[np.ndarray, list[str], str]:
        """The first `count` training samples as the network sees them, their class names and
        a title."""
        images, captions = first_samples(self.splits()["train"], self.info.class_names, count)
        return images, captions, f"{self.name}: training samples as the network sees them"

    def skipped_images(self) -> list[tuple[str, str]]:
        """(path, why) of every file left out so far because it could not be read (with
        `skip_bad_images`); none for sets read whole."""
        return []

    def skipped_while_loading(self) -> list[tuple[str, str]]:
        """Those of `skipped_images` found only when decoded, while loading."""
        return []

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pool, fixed_test = self.load()
        split_generator = torch.Generator().manual_seed(self.seed)
        n = len(pool)
        n_val = max(1, round(n * self.val_fraction))
        if fixed_test is None:
            n_test = max(1, round(n * self.test_fraction))
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

    @property
    def device(self) -> torch.device:
        """Where `data.on_device` keeps the splits: the trainer's device for this process."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return self.device_without_trainer

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        dataset = self.splits()[split]
        augmented = split == "train" and self.augment != "none"
        # The loader draws its workers' base seed from this generator too; with the global
        # one it would shift the dropout draws between a run and its resumption.
        generator = self.shuffle_generator if sampler is not None else None
        size = self.batch_size
        if self.on_device:
            key = (split, self.device)
            if key not in self._stacked:
                self._stacked[key] = stack_split(
                    dataset, self.num_workers, self.device, self.collate()
                )
            return DataLoader(
                self._stacked[key], size, sampler=sampler, generator=generator,
                collate_fn=batch_as_is,
            )  # fmt: skip
        workers = self.num_workers
        return DataLoader(
            AugmentedSplit(dataset) if augmented else dataset,
            batch_size=size,
            sampler=sampler,
            generator=generator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=self.collate(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_sampler is None:
            self.train_sampler = ResumableRandomSampler(
                len(self.train_set), self.shuffle_generator, draws=self.augment != "none"
            )
        return self._loader("train", self.train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _batches_done_this_epoch(self) -> int:
        """Training batches of the current epoch already done; 0 at an epoch's end."""
        trainer = self.trainer
        # Under DDP Lightning wraps the sampler to shard it, and a skip would shift the shards.
        if trainer is None or trainer.world_size > 1:
            return 0
        # "processed", not "completed": a checkpoint taken in on_train_batch_end sees the batch
        # processed but not yet counted as completed (Lightning completes it on restore).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done if done < trainer.num_training_batches else 0

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shuffle_generator": self.shuffle_generator.get_state()}
        done = self._batches_done_this_epoch()
        sampler = self.train_sampler
        if done and sampler is not None and sampler.epoch_state is not None:
            state["epoch_order"] = sampler.epoch_state
            state["samples_done"] = done * self.batch_size
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shuffle_generator.set_state(state_dict["shuffle_generator"])
        if "epoch_order" in state_dict:
            self.setup()
            self.train_dataloader()
            assert self.train_sampler is not None
            self.train_sampler.resume(state_dict["epoch_order"], state_dict["samples_done"])
