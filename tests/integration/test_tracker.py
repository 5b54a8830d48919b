"""The epoch tracker's output, read back through MlflowClient from real runs."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import warnings
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness.callbacks.mlflow_tracking import MlflowTracking
from dlharness.data.base import image_transform
from dlharness.data.digits import DigitsDataModule, digit_images
from dlharness.data.fingerprint import content_digest
from dlharness.models.classifier import ClassifierModule
from dlharness.models.nets import build_net
from dlharness.tracking.checkpointing.artifacts import (
    CheckpointError,
    fetch_checkpoint,
    file_sha256,
)
from dlharness.tracking.checkpointing.background_io import BackgroundCheckpointIO
from dlharness.tracking.pictures import charts
from dlharness.tracking.pictures.files import write_step_image
from dlharness.tracking.pictures.step_images import (
    LOGGED_IMAGES_TAG,
    log_step_image_files,
    step_image_paths,
)
from dlharness.tracking.provenance.environment import (
    Environment,
    GpuInfo,
    collect_environment,
    environment_tags,
)
from dlharness.tracking.worker import TrackingWarning, TrackingWorker
from dlharness.training.components import build_datamodule
from dlharness.training.config import DataConfig
from dlharness.training.train import train

from ..conftest import (
    DEFAULT_RUN_TAGS,
    REGISTERED_NAME,
    REPO,
    artifact_paths,
    empty_store,
    tiny_config,
)

IMAGE_NAME = re.compile(
    r"images/val_confusion_matrix\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$"
)


@pytest.fixture
def run(logged_default_run):
    return logged_default_run


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, dst_path=str(dst)))


def assert_png(path: Path, min_side: int = 100) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side
        assert len(np.unique(np.asarray(image.convert("L")))) > 2, "image is blank"


# 1. Per-epoch curves and confusion matrices


@pytest.mark.parametrize("name", ["plots/loss_curves.png", "plots/metric_curves.png"])
def test_curves_are_valid_pngs(run, tmp_path, name):
    _, result, client, _ = run
    assert_png(download(client, result.run_id, name, tmp_path))


def test_one_confusion_matrix_image_per_epoch(run):
    cfg, result, client, _ = run
    steps = [
        int(m.group(1))
        for p in all_artifacts(client, result.run_id, "images")
        if (m := IMAGE_NAME.search(p))
    ]
    assert sorted(steps) == list(range(cfg.trainer.max_epochs))


def test_step_images_are_stored_as_mlflows_own_log_image_stores_them(store, tmp_path):
    """The UI finds step-keyed pictures by MLflow's file names and tag; ours must match."""
    client = MlflowClient(store)
    [experiment] = client.search_experiments(filter_string="name = 'tests'")
    picture = charts.confusion_chart(np.eye(3, dtype=int) * 5, ["a", "b", "c"], "confusion")
    by_mlflow = client.create_run(experiment.experiment_id).info.run_id
    client.log_image(by_mlflow, picture, key="val/confusion", step=3)
    ours = client.create_run(experiment.experiment_id).info.run_id
    # As MlflowTracking(fast_images=True) stores them: files written, then logged.
    png, webp = step_image_paths(tmp_path, "val/confusion", 3)
    write_step_image(picture, png, webp)
    log_step_image_files(client, ours, png, webp)
    client.set_tag(ours, LOGGED_IMAGES_TAG, "True")

    names = {run: artifact_paths(client, run) for run in (by_mlflow, ours)}
    assert names[ours] == names[by_mlflow]
    assert len(names[ours]) == 2
    assert (
        client.get_run(ours).data.tags[LOGGED_IMAGES_TAG]
        == (client.get_run(by_mlflow).data.tags[LOGGED_IMAGES_TAG])
    )
    for run in (by_mlflow, ours):
        folder = Path(client.download_artifacts(run, "images", str(tmp_path / run)))
        stored = {}
        for path in folder.iterdir():
            with Image.open(path) as image:
                stored[path.suffix] = (image.format, image.size, np.asarray(image.convert("RGB")))
        assert stored[".png"][:2] == ("PNG", picture.size)
        assert np.array_equal(stored[".png"][2], np.asarray(picture))
        assert stored[".webp"][:2] == ("WEBP", (256, 256))


# 2. Checkpoints


def checkpoint_epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(
        int(item.path.rsplit("_", 1)[1]) for item in client.list_artifacts(run_id, "checkpoints")
    )


def test_retention_keeps_the_last_k_and_the_best(run):
    cfg, result, client, run_entity = run
    kept = checkpoint_epochs(client, result.run_id)
    best = int(run_entity.data.tags["dlharness.best_checkpoint_epoch"])
    last_k = list(range(cfg.trainer.max_epochs))[-cfg.tracker.keep_last_checkpoints :]
    assert kept == sorted(set(last_k) | {best})
    history = client.get_metric_history(result.run_id, "val/loss")
    assert best == min(history, key=lambda m: m.value).step


def test_checkpoints_are_mlflow_loadable_and_match_their_records(run, tmp_path):
    _, result, client, run_entity = run
    assert (
        run_entity.data.tags["mlflow.latest_checkpoint_artifact"]
        == "checkpoints/epoch_19/checkpoint.pth"
    )
    for epoch in checkpoint_epochs(client, result.run_id):
        record = json.loads(
            download(
                client,
                result.run_id,
                f"checkpoints/epoch_{epoch}/checkpoint_metrics.json",
                tmp_path,
            ).read_text()
        )
        path = fetch_checkpoint(client, result.run_id, epoch, tmp_path / str(epoch))
        assert record["sha256"] == file_sha256(path)
        assert record["epoch"] == epoch
        assert record["val/loss"] == pytest.approx(
            client.get_metric_history(result.run_id, "val/loss")[epoch].value
        )
        module = mlflow.pytorch.load_checkpoint(ClassifierModule, result.run_id, epoch=epoch)
        state = torch.load(path, weights_only=True)
        for key, value in module.state_dict().items():
            assert torch.equal(value, state["state_dict"][key]), key


def test_checkpoint_is_complete_for_an_exact_resume(run, tmp_path):
    _, result, client, _ = run
    epoch = checkpoint_epochs(client, result.run_id)[-1]
    state = torch.load(fetch_checkpoint(client, result.run_id, epoch, tmp_path), weights_only=True)
    assert state["epoch"] == epoch
    assert state["optimizer_states"] and state["lr_schedulers"]
    assert "fit_loop" in state["loops"]
    callbacks = state["callbacks"]
    rng = callbacks["MlflowTracking"]["rng"]
    assert {"torch", "numpy", "python"} <= set(rng)
    assert sorted(callbacks["MlflowTracking"]["history"]) == list(range(epoch + 1))
    assert "shuffle_generator" in state["DigitsDataModule"]


def test_one_stored_copy_per_checkpoint_and_no_local_leftovers(default_run, run):
    _, result, client, _ = run
    model_files = [
        p for p in all_artifacts(client, result.run_id) if p.endswith((".pth", ".ckpt", ".pt"))
    ]
    assert model_files == [
        f"checkpoints/epoch_{e}/checkpoint.pth" for e in checkpoint_epochs(client, result.run_id)
    ]
    assert default_run.scratch_left == []


def test_all_checkpoints_kept_when_retention_is_off(store):
    result = train(
        tiny_config(store, **{"trainer.max_epochs": 3, "tracker.keep_last_checkpoints": None})
    )
    client = MlflowClient(store)
    assert checkpoint_epochs(client, result.run_id) == [0, 1, 2]


def test_background_checkpoint_holds_the_state_at_save_time(tmp_path):
    """The worker writes the file later; training changing the weights meanwhile must not
    reach it. A save elsewhere (a user's own ModelCheckpoint) is written at once, as before."""
    worker = TrackingWorker()
    gate = threading.Event()
    worker.submit("held", gate.wait)  # the write waits behind this until training moved on
    try:
        net = build_net(
            {"name": "cnn", "in_channels": 1, "num_classes": 3, "image_size": 8, "width": 4}
        )
        optimizer = torch.optim.Adam(net.parameters())
        net(torch.ones(2, 1, 8, 8)).sum().backward()
        optimizer.step()
        checkpoint = {
            "state_dict": net.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
            "rng": {"python": random.getstate()},  # a tuple of 625 ints, kept as a tuple
        }
        saved = {key: value.clone() for key, value in net.state_dict().items()}
        saved_moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
        (tmp_path / "ours").mkdir()
        io = BackgroundCheckpointIO(worker, TorchCheckpointIO(), tmp_path / "ours")
        io.save_checkpoint(checkpoint, tmp_path / "ours" / "c.pth")
        io.save_checkpoint(checkpoint, tmp_path / "elsewhere.ckpt")
        assert (tmp_path / "elsewhere.ckpt").is_file()
        assert not (tmp_path / "ours" / "c.pth").exists()

        net(torch.ones(2, 1, 8, 8)).sum().backward()
        optimizer.step()
    finally:
        gate.set()
        worker.close()
    written = torch.load(tmp_path / "ours" / "c.pth", weights_only=False)
    assert not all(torch.equal(net.state_dict()[key], value) for key, value in saved.items())
    for key, value in saved.items():
        assert torch.equal(written["state_dict"][key], value), key
    moments = [s["exp_avg"] for s in written["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, saved_moments, strict=True))
    assert written["rng"]["python"] == checkpoint["rng"]["python"]
    assert type(written["state_dict"]) is type(net.state_dict())


def test_tampered_checkpoint_is_detected_and_named(store, tmp_path):
    result = train(
        tiny_config(
            store, **{"trainer.max_epochs": 1, "tracker.onnx": False, "tracker.plots": False}
        )
    )
    client = MlflowClient(store)
    artifact_root = urlparse(client.get_run(result.run_id).info.artifact_uri).path
    stored = Path(artifact_root) / "checkpoints/epoch_0/checkpoint.pth"
    stored.write_bytes(stored.read_bytes()[:1000])
    with pytest.raises(
        CheckpointError, match=r"checkpoints/epoch_0/checkpoint\.pth .* does not match its sha256"
    ):
        fetch_checkpoint(client, result.run_id, 0, tmp_path)


# 3. Environment, GPU and system metrics


def test_cpu_run_has_environment_tags_and_no_gpu_keys(run):
    _, _, _, run_entity = run
    tags = run_entity.data.tags
    expected = {
        "env.accelerator",
        "env.devices",
        "env.nodes",
        "env.world_size",
        "env.precision",
        "gpu.count",
        "torch.version",
        "lightning.version",
        "mlflow.version",
        "python.version",
        "host.cpu",
        "host.cores",
    }
    assert expected <= set(tags)
    assert tags["torch.version"] == torch.__version__
    assert tags["mlflow.version"] == mlflow.__version__
    assert tags["host.cores"] == str(os.cpu_count())
    if not torch.cuda.is_available():
        assert tags["env.accelerator"] == "cpu"
        assert tags["gpu.count"] == "0"
        assert not {
            k
            for k in tags
            if k.startswith(("gpu.name", "gpu.memory", "gpu.compute", "cuda.", "cudnn.", "nvidia."))
        }


def test_gpu_tags_from_a_device_description():
    gpus = (GpuInfo("NVIDIA H100 80GB HBM3", 85_520_809_984, (9, 0)),) * 2
    env = Environment(
        "gpu", 2, "bf16-mixed", gpus, "12.8", "91002", "570.86.15", {"torch": "2.14.1"}, "Xeon", 32
    )
    tags = environment_tags(env)
    assert tags["gpu.count"] == "2"
    assert tags["gpu.name"] == "NVIDIA H100 80GB HBM3"
    assert tags["gpu.memory_gb"] == "79.6"
    assert tags["gpu.compute_capability"] == "9.0"
    assert tags["cuda.version"] == "12.8"
    assert tags["cudnn.version"] == "91002"
    assert tags["nvidia.driver"] == "570.86.15"
    assert tags["env.devices"] == "2"
    assert tags["env.precision"] == "bf16-mixed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_is_described():
    tags = environment_tags(collect_environment("gpu", 1, "bf16-mixed"))
    assert int(tags["gpu.count"]) == torch.cuda.device_count() >= 1
    assert tags["gpu.name"] == torch.cuda.get_device_name(0)
    assert float(tags["gpu.memory_gb"]) > 1
    assert tags["cuda.version"] == torch.version.cuda


def test_system_metrics_are_sampled_by_default_and_can_be_turned_off(run, store):
    _, _, _, run_entity = run
    assert any(key.startswith("system/cpu_utilization") for key in run_entity.data.metrics)
    off = train(
        tiny_config(
            store,
            **{"trainer.max_epochs": 1, "tracking.system_metrics": False, "tracker.onnx": False},
        )
    )
    metrics = MlflowClient(store).get_run(off.run_id).data.metrics
    assert not [key for key in metrics if key.startswith("system/")]


# 4. Source and environment files


def test_requirements_pin_what_is_installed(run, tmp_path):
    _, result, client, _ = run
    lines = download(client, result.run_id, "requirements.txt", tmp_path).read_text().splitlines()
    for package in ("torch", "mlflow", "lightning", "torchmetrics"):
        assert f"{package}=={metadata.version(package)}" in lines


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="the source is not a git checkout")
def test_git_commit_and_dirty_flag(run):
    _, _, _, run_entity = run
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert run_entity.data.tags["mlflow.source.git.commit"] == head
    assert run_entity.data.tags["git.dirty"] == str(bool(status.strip())).lower()


# 5. Datasets


def test_every_split_is_recorded_with_digest_source_and_shape(run, tmp_path):
    cfg, result, client, run_entity = run
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run_entity.inputs.dataset_inputs
    }
    assert set(inputs) == {"train", "val", "test"}
    datamodule = build_datamodule(cfg.data, cfg.seed)
    for split, subset in datamodule.splits().items():
        record = inputs[split]
        assert record.name == f"digits-{split}"
        assert record.digest == content_digest(subset)
        profile = json.loads(record.profile)
        assert profile["features_shape"] == [len(subset), 1, 8, 8]
        assert "load_digits" in record.source
    assert inputs["train"].digest != inputs["val"].digest
    assert_png(download(client, result.run_id, "datasets/train_samples.png", tmp_path))


def test_digest_changes_with_the_content(tmp_path):
    from .datafiles import write_mnist

    write_mnist(tmp_path / "a", "MNIST", 20, 5, seed=1)
    write_mnist(tmp_path / "b", "MNIST", 20, 5, seed=2)
    digests = [
        build_datamodule(DataConfig(dataset="mnist", data_dir=str(tmp_path / d)), 0).splits()
        for d in "ab"
    ]
    assert content_digest(digests[0]["test"]) != content_digest(digests[1]["test"])


# 6. Evaluation on the test split with the best checkpoint


def test_evaluation_uses_the_best_checkpoint(run):
    _, result, _, run_entity = run
    assert result.evaluated_epoch == int(run_entity.data.tags["dlharness.best_checkpoint_epoch"])


def test_evaluation_artifacts_agree_with_each_other(run, tmp_path):
    _, result, client, run_entity = run
    n_test = int(run_entity.data.params["data.n_test"])
    matrix = json.loads(
        download(client, result.run_id, "evaluation/confusion_matrix.json", tmp_path).read_text()
    )
    counts = np.array(matrix["matrix"])
    assert counts.shape == (10, 10) and counts.sum() == n_test
    predictions = mlflow.load_table("evaluation/predictions.json", run_ids=[result.run_id])
    assert len(predictions) == n_test
    assert predictions["correct"].mean() == pytest.approx(
        run_entity.data.metrics["test/acc"], abs=1e-6
    )
    assert np.trace(counts) == predictions["correct"].sum()
    per_class = mlflow.load_table("evaluation/per_class_metrics.json", run_ids=[result.run_id])
    assert [str(c) for c in per_class["class"]] == [str(d) for d in range(10)]
    assert per_class["support"].sum() == n_test
    assert per_class["f1"].mean() == pytest.approx(run_entity.data.metrics["test/f1"], abs=1e-4)
    for name in ("confusion_matrix.png", "roc_curves.png"):
        assert_png(download(client, result.run_id, f"evaluation/{name}", tmp_path))
    misclassified = download(client, result.run_id, "evaluation/misclassified.png", tmp_path)
    with Image.open(misclassified) as image:
        assert image.format == "PNG"


# 7. Models


def test_onnx_export_matches_pytorch(run):
    _, result, _, _ = run
    onnx_model = mlflow.onnx.load_model(result.onnx_model_uri)
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(7, 1, 8, 8)
    module = result.module.cpu().eval()
    with torch.no_grad():
        expected = module(x).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_registered_model_is_the_served_classifier_with_the_candidate_alias(run):
    _, result, client, _ = run
    version = client.get_model_version_by_alias(REGISTERED_NAME, "candidate")
    assert str(version.version) == result.registered_version
    assert version.run_id == result.run_id
    assert version.source == result.classifier_uri
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}@candidate")
    images, _ = digit_images()
    answers = model.predict([image[0].numpy() for image in images[:3]])
    x = image_transform(*DigitsDataModule().normalization, None)(images[:3])
    with torch.no_grad():
        expected = result.module.cpu().eval()(x).softmax(dim=1).numpy()
    got = [[a.probabilities[str(digit)] for digit in range(10)] for a in answers]
    np.testing.assert_allclose(got, expected, atol=1e-5)


# 8. Run details


def test_model_and_author_tags(run):
    _, result, _, run_entity = run
    tags = run_entity.data.tags
    assert tags["model.type"] == "cnn"
    assert tags["model.class"] == "SmallCNN"
    assert tags["model.parameters"] == str(sum(p.numel() for p in result.module.net.parameters()))
    assert tags["author"] == DEFAULT_RUN_TAGS["author"]
    assert tags["mlflow.note.content"] == DEFAULT_RUN_TAGS["description"]


# 9. A tracking failure warns and never kills training


def test_tracking_failures_warn_and_training_finishes(tmp_path):
    """Artifacts go under a regular file, so every upload fails for real; metrics still land."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    uri = empty_store(tmp_path)
    client = MlflowClient(uri)
    experiment = client.create_experiment(
        "broken", artifact_location=(blocker / "artifacts").as_uri()
    )
    datamodule = build_datamodule(DataConfig(batch_size=256), seed=0)
    spec = {
        "name": "cnn",
        "in_channels": 1,
        "num_classes": 10,
        "image_size": 8,
        "width": 4,
        "dropout": 0.0,
    }
    module = ClassifierModule(build_net(spec), net_spec=spec)
    tracking = MlflowTracking(
        tracking_uri=uri, class_names=datamodule.info.class_names, system_metrics=False
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[tracking],
    )
    mlflow.set_tracking_uri(uri)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run(experiment_id=experiment):
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished and trainer.current_epoch == 2
    messages = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert any("checkpoint upload failed" in m for m in messages)
    assert any("epoch plots failed" in m for m in messages)
    assert len([m for m in messages if "checkpoint upload" in m]) == 1, (
        "reported once, not per epoch"
    )
    run_id = tracking.run.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0, 1]
