"""The user's own image folder as it comes: files that are no images, a JPEG cut short, a
file damaged while training, and torchvision sets' files cut short on disk."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness.callbacks.dataset_records import (
    SKIPPED_IMAGES_FILE,
    SKIPPED_IMAGES_TAG,
    SKIPPED_WHILE_LOADING,
)
from dlharness.data.fingerprint import content_digest
from dlharness.data.imagefolder import ImageFolderDataModule
from dlharness.training.cli import main as train_main
from dlharness.training.train import FAILURE_TAG

from ..conftest import AfterStoredCheckpoint, cli_trains_with, run_statuses
from .datafiles import write_cifar10, write_image_folder, write_mnist

FOLDER = {"red": 10, "green": 10, "blue": 10}


def cut_jpeg(path: Path) -> None:
    """A JPEG as half a download leaves it: its header whole, its pixels cut."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def damaged_folder(root: Path) -> tuple[Path, Path]:
    write_image_folder(root, FOLDER)
    text = root / "red" / "broken.png"
    text.write_text("<html>not an image</html>")
    cut = root / "green" / "cut.jpg"
    cut_jpeg(cut)
    return text, cut


def cli(store: str, root: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "imagefolder", "--data-dir", str(root), "--tracking-uri", store,
        "--experiment", "tests", "--max-epochs", "2", "--batch-size", "8",
        "--no-system-metrics", *extra,
    ]  # fmt: skip


def test_a_folder_with_files_that_are_no_images_is_refused_before_any_run(tmp_path, store, capsys):
    text, _ = damaged_folder(tmp_path / "images")
    (tmp_path / "images" / "blue" / "empty.png").write_bytes(b"")
    capsys.readouterr()
    assert train_main(cli(store, tmp_path / "images")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "2 files are not readable images" in err and str(text) in err
    assert "empty file" in err and "--skip-bad-images" in err
    assert run_statuses(store) == []


def test_skip_bad_images_trains_on_the_rest_and_records_what_it_left_out(tmp_path, store, capsys):
    text, cut = damaged_folder(tmp_path / "images")
    capsys.readouterr()
    assert train_main(cli(store, tmp_path / "images", "--skip-bad-images")) == 0
    out = capsys.readouterr().out
    run_id = re.search(r"^run ([0-9a-f]{32}) finished", out, re.MULTILINE).group(1)
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.data.tags[SKIPPED_IMAGES_TAG] == "2"
    listed = Path(client.download_artifacts(run_id, SKIPPED_IMAGES_FILE, str(tmp_path)))
    why = dict(line.split("\t") for line in listed.read_text().splitlines())
    assert set(why) == {str(text), str(cut)}
    assert "cannot identify image file" in why[str(text)] and "truncated" in why[str(cut)]
    assert [m.step for m in client.get_metric_history(run_id, SKIPPED_WHILE_LOADING)] == [0, 1]
    assert run.data.params["data.skip_bad_images"] == "True"

    # The dataset records describe the files used: those of the folder without the text file
    # (the cut JPEG passes the header check and is left out only when decoded), and not those
    # of the whole folder with a real image in its place.
    used = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    without = tmp_path / "without"
    shutil.copytree(tmp_path / "images", without)
    (without / "red" / "broken.png").unlink()
    assert split_digests(without) == used
    whole = tmp_path / "whole"
    shutil.copytree(without, whole)
    shutil.copy(whole / "red" / "0.png", whole / "red" / "broken.png")
    assert split_digests(whole)["imagefolder-train"] != used["imagefolder-train"]


def split_digests(folder: Path) -> dict[str, str]:
    """The content digest of each split the harness makes of `folder` (its default seed)."""
    datamodule = ImageFolderDataModule(data_dir=str(folder), skip_bad_images=True)
    datamodule.prepare_data()
    return {f"imagefolder-{k}": content_digest(v) for k, v in datamodule.splits().items()}


def test_a_file_damaged_during_training_fails_the_run_in_one_line_that_resumes_it(
    tmp_path, store, capsys, monkeypatch
):
    root = tmp_path / "images"
    write_image_folder(root, FOLDER)
    kept = {path: path.read_bytes() for path in (root / "red").iterdir()}

    def damage() -> None:  # every red image cut in half: epoch 1's batches reach one
        for path, content in kept.items():
            path.write_bytes(content[: len(content) // 2])

    cli_trains_with(monkeypatch, AfterStoredCheckpoint(tmp_path / "artifacts", 1, damage))
    capsys.readouterr()
    assert train_main(cli(store, root)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    named = re.search(r"image file (\S+) cannot be decoded", err).group(1)
    assert Path(named) in kept
    [run] = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("tests").experiment_id]
    )
    assert run.info.status == "FAILED"
    assert named in run.data.tags[FAILURE_TAG]

    # The printed command resumes once the file is back as it was.
    for path, content in kept.items():
        path.write_bytes(content)
    command = err.split("resume: ", 1)[1].split("; or ", 1)[0].split()
    monkeypatch.undo()
    assert train_main(command[command.index("--resume") :]) == 0
    assert MlflowClient(store).get_run(run.info.run_id).info.status == "FINISHED"


def test_torchvision_files_cut_short_are_one_line_before_any_run(tmp_path, store, capsys):
    write_cifar10(tmp_path / "cifar", per_batch=4)
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    write_mnist(tmp_path / "mnist", "MNIST", n_train=40, n_test=12)
    images = tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:500])
    for dataset, root, named in [("cifar10", "cifar", str(batch)), ("mnist", "mnist", "damaged")]:
        capsys.readouterr()
        argv = ["--dataset", dataset, "--data-dir", str(tmp_path / root), "--tracking-uri", store]
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert named in err, err
    assert run_statuses(store) == []
