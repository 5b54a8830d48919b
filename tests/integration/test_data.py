from __future__ import annotations

import os
import pickle

import pytest
import torch

from dlharness.data.augmentation import crop_flip
from dlharness.errors import UsageError
from dlharness.training.components import build_datamodule
from dlharness.training.config import DataConfig

from .datafiles import write_cifar10, write_image_folder, write_mnist


def datamodule(seed: int = 42, **values):
    return build_datamodule(DataConfig(**values), seed)


def test_digits_split_is_seeded_and_uses_every_sample():
    dm = datamodule()
    sizes = dm.split_sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == sizes["test"] == round(1797 * 0.15)
    same, other = datamodule(), datamodule(seed=7)
    same.setup(), other.setup()
    assert dm.train_set.indices == same.train_set.indices
    assert dm.train_set.indices != other.train_set.indices
    assert not set(dm.train_set.indices) & set(dm.test_set.indices)


def test_setup_twice_keeps_the_same_split():
    dm = datamodule()
    dm.setup("fit")
    first = list(dm.val_set.indices)
    dm.setup("test")
    assert list(dm.val_set.indices) == first


def test_digits_batches_are_normalised_images():
    dm = datamodule(batch_size=32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.max()) <= 9
    assert dm.info.num_classes == 10 and dm.info.in_channels == 1 and dm.info.image_size == 8


def test_shuffle_order_follows_the_generator_state():
    dm = datamodule(batch_size=16)
    dm.setup()
    state = dm.state_dict()
    first = next(iter(dm.train_dataloader()))[1]
    second_epoch = next(iter(dm.train_dataloader()))[1]
    assert not torch.equal(first, second_epoch)
    dm.load_state_dict(state)
    assert torch.equal(next(iter(dm.train_dataloader()))[1], first)


@pytest.mark.parametrize(
    ("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_family_reads_idx_files(tmp_path, dataset, folder):
    written = write_mnist(tmp_path, folder, n_train=40, n_test=12)
    dm = datamodule(dataset=dataset, data_dir=str(tmp_path), batch_size=64, val_fraction=0.25)
    dm.prepare_data()
    assert dm.split_sizes() == {"train": 30, "val": 10, "test": 12}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (12, 1, 28, 28)
    assert y.tolist() == written["t10k"][1].tolist()
    # Undo the normalisation: the pixels are the ones written to the idx file.
    mean, std = dm.mean[0], dm.std[0]
    pixels = ((x[:, 0] * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(written["t10k"][0]))


def test_missing_mnist_files_name_the_expected_folder(tmp_path):
    dm = datamodule(dataset="mnist", data_dir=str(tmp_path))
    with pytest.raises(UsageError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "--download" in message and "\n" not in message


def test_cifar10_reads_python_batches_with_planes_in_rgb_order(tmp_path):
    written = write_cifar10(tmp_path, per_batch=6)
    dm = datamodule(dataset="cifar10", data_dir=str(tmp_path), val_fraction=0.2, batch_size=64)
    dm.prepare_data()
    assert dm.split_sizes() == {"train": 24, "val": 6, "test": 6}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 32, 32)
    data, labels = written["test_batch"]
    assert y.tolist() == labels
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    pixels = ((x * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(data.reshape(-1, 3, 32, 32)))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_batch_with_a_code_payload_is_refused(tmp_path):
    write_cifar10(tmp_path, per_batch=2)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": payload}))
    dm = datamodule(dataset="cifar10", data_dir=str(tmp_path))
    with pytest.raises(UsageError, match="refusing to load"):
        dm.setup()
    assert not marker.exists()


def test_imagefolder_resizes_and_splits_png_files(tmp_path):
    write_image_folder(tmp_path, {"cat": 10, "dog": 8, "emu": 2})
    dm = datamodule(
        dataset="imagefolder",
        data_dir=str(tmp_path),
        image_size=16,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.prepare_data()
    assert dm.info.class_names == ("cat", "dog", "emu")
    assert dm.info.in_channels == 3
    assert dm.split_sizes() == {"train": 12, "val": 4, "test": 4}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)
    assert set(y.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (None, "does not exist"),
        ({}, "no class sub-folders"),
        ({"only": 3}, "at least 2 class folders"),
    ],
)
def test_imagefolder_problems_are_one_line(tmp_path, layout, expected):
    root = tmp_path / "images"
    if layout is not None:
        root.mkdir()
        write_image_folder(root, layout)
    dm = datamodule(dataset="imagefolder", data_dir=str(root))
    with pytest.raises(UsageError, match=expected):
        dm.prepare_data()


def test_download_failure_is_reported_on_one_line(tmp_path):
    # A data dir that is a file fails the download before any network access.
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    dm = datamodule(dataset="mnist", data_dir=str(blocker), download=True)
    with pytest.raises(UsageError) as info:
        dm.prepare_data()
    assert f"downloading mnist into {blocker / 'MNIST' / 'raw'} failed" in str(info.value)
    assert "\n" not in str(info.value)


def first_batches(**values) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dm = datamodule(**values)
    dm.setup()
    return {
        split: next(iter(loader()))
        for split, loader in (
            ("train", dm.train_dataloader),
            ("val", dm.val_dataloader),
            ("test", dm.test_dataloader),
        )
    }


def test_augmentation_changes_training_batches_only_and_follows_the_seed():
    plain, augmented = first_batches(augment="none"), first_batches(augment="crop_flip")
    (x_plain, y_plain), (x_aug, y_aug) = plain["train"], augmented["train"]
    assert torch.equal(y_plain, y_aug)  # the same samples, in the same order
    changed = [not torch.equal(a, b) for a, b in zip(x_plain, x_aug, strict=True)]
    assert sum(changed) > len(changed) / 2
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(plain[split], augmented[split], strict=True))
    again = first_batches(augment="crop_flip")["train"]
    assert all(torch.equal(a, b) for a, b in zip(again, augmented["train"], strict=True))
    other_seed = first_batches(augment="crop_flip", seed=1)["train"]
    assert not torch.equal(other_seed[0], x_aug)


def test_augmentation_on_the_device_equals_the_loaders():
    """`data.on_device` augments whole batches at once: the same pictures as per sample."""
    through_loader = first_batches(augment="crop_flip")["train"]
    on_device = first_batches(augment="crop_flip", on_device=True)["train"]
    assert all(torch.equal(a, b) for a, b in zip(on_device, through_loader, strict=True))


def test_crop_flip_moves_pixels_as_its_draw_says():
    # 8×8 images pad by 1: offsets 0..2 across and down, then the flip; draw = dx + 3 dy + 9 f.
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2, 5] = 1.0
    for draw, (row, col) in {0: (3, 6), 4: (2, 5), 8: (1, 4), 9: (3, 1), 17: (1, 3)}.items():
        out = crop_flip(image, torch.tensor([draw]))
        assert out.shape == image.shape
        assert out[0, 0, row, col] == 1.0 and out.sum() == 1.0, draw


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("cifar10", "crop_flip"), ("digits", "none"), ("mnist", "none"), ("fashion_mnist", "none")],
)
def test_augmentation_defaults_to_crop_flip_for_cifar10_only(dataset, expected):
    assert datamodule(dataset=dataset).augment == expected
    assert datamodule(dataset=dataset, augment="none").augment == "none"
