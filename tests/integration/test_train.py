"""One real default run (digits, 20 epochs) read back through MlflowClient, plus edge cases."""

from __future__ import annotations

import itertools

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dlharness.errors import UsageError
from dlharness.tracking.params import flatten
from dlharness.training.config import load_config
from dlharness.training.train import build_trainer, train

from ..conftest import run_statuses, tiny_config
from .datafiles import write_image_folder

EPOCH_METRICS = [
    f"{stage}/{name}"
    for stage in ("train", "val")
    for name in ("loss", "acc", "precision", "recall", "f1", "auroc")
]
TEST_METRICS = [f"test/{name}" for name in ("loss", "acc", "precision", "recall", "f1", "auroc")]


@pytest.fixture
def logged(logged_default_run):
    return logged_default_run


def test_default_config_reaches_97_percent_test_accuracy(logged):
    cfg, result, _, run = logged
    assert cfg.trainer.max_epochs <= 20 and cfg.data.dataset == "digits"
    assert result.test_metrics["test/acc"] >= 0.97
    assert run.data.metrics["test/acc"] == pytest.approx(result.test_metrics["test/acc"])
    assert run.info.status == "FINISHED"


def test_timings_say_how_long_training_waited_on_tracking(logged):
    """The training thread's time in the callback's hooks holds the checkpoint copies and is
    part of the fit."""
    _, result, _, _ = logged
    t = result.timings
    assert 0 < t["checkpoint_save"] <= t["tracking_hooks"] < t["fit"]


@pytest.mark.parametrize("key", [*EPOCH_METRICS, "train/lr"])
def test_every_epoch_metric_has_one_value_per_epoch(logged, key):
    cfg, result, client, _ = logged
    history = client.get_metric_history(result.run_id, key)
    assert sorted(m.step for m in history) == list(range(cfg.trainer.max_epochs))


def test_cosine_schedule_is_visible_in_the_logged_learning_rate(logged):
    cfg, result, client, _ = logged
    lrs = [
        m.value
        for m in sorted(client.get_metric_history(result.run_id, "train/lr"), key=lambda m: m.step)
    ]
    assert lrs[0] == pytest.approx(cfg.optim.lr)
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_test_metrics_are_logged_once_at_the_evaluated_epoch(logged):
    _, result, client, run = logged
    assert run.data.tags["dlharness.evaluated_epoch"] == str(result.evaluated_epoch)
    for key in TEST_METRICS:
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [result.evaluated_epoch], key


def test_resolved_config_is_logged_whole(logged):
    cfg, result, _, run = logged
    params = run.data.params
    for key, value in flatten(cfg.to_dict()).items():
        assert params[key] == ("" if value is None else str(value)), key
    assert params["tracking.tracking_uri"] == result.tracking_uri
    assert {"data.n_train", "data.n_val", "data.n_test"} <= set(params)
    assert params["data.val_fraction"] == "0.15"
    path = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="config.yaml", tracking_uri=result.tracking_uri
    )
    with open(path) as fh:
        assert load_config(None, flatten(yaml.safe_load(fh))) == cfg


def test_user_tags_are_set(logged):
    assert logged[3].data.tags["author"] == "tests"


def test_autolog_really_logged(logged):
    """What mlflow.pytorch.autolog adds on its own: optimizer params, epochs, model summary."""
    cfg, result, client, run = logged
    params = run.data.params
    assert params["epochs"] == str(cfg.trainer.max_epochs)
    assert params["optimizer_name"] == "Adam"
    assert params["lr"] == str(cfg.optim.lr)
    assert "betas" in params
    assert run.data.tags.get("Mode") == "training"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "model_summary.txt" in artifacts
    summary = mlflow.artifacts.load_text(f"runs:/{result.run_id}/model_summary.txt")
    assert "SmallCNN" in summary


def test_logged_model_predicts_like_the_trained_module(logged):
    _, result, _, _ = logged
    module = result.module.eval().cpu()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = module(x).numpy()
    loaded = mlflow.pytorch.load_model(result.model_uri)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_logged_model_has_signature_input_example_and_pinned_requirements(logged):
    _, result, _, _ = logged
    info = mlflow.models.get_model_info(result.model_uri)
    input_spec = info.signature.inputs.inputs[0]
    assert tuple(input_spec.shape) == (-1, 1, 8, 8)
    assert info.saved_input_example_info is not None
    models = mlflow.search_logged_models(
        experiment_ids=[result.experiment_id], output_format="list"
    )
    # The run's final models, beside a model per kept checkpoint.
    finals = [m for m in models if m.model_type != "checkpoint"]
    assert {m.name for m in finals} == {"model", "model_onnx", "classifier"}
    assert {m.source_run_id for m in models} == {result.run_id}
    model = mlflow.get_logged_model(result.model_uri.removeprefix("models:/"))
    requirements = mlflow.artifacts.load_text(f"{model.artifact_location}/requirements.txt")
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements.splitlines()


def test_imagefolder_trains_end_to_end(tmp_path, store):
    write_image_folder(tmp_path / "images", {"red": 12, "green": 12, "blue": 12})
    cfg = tiny_config(
        store,
        **{
            "data.dataset": "imagefolder",
            "data.data_dir": str(tmp_path / "images"),
            "data.image_size": 16,
            "data.batch_size": 8,
        },
    )
    result = train(cfg)
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.n_train"] == str(36 - 2 * round(36 * 0.15))
    assert set(result.test_metrics) == set(TEST_METRICS)
    [record, *_] = [d.dataset for d in run.inputs.dataset_inputs]
    assert record.source_type == "local"
    assert str(tmp_path / "images") in record.source
    # The served classifier takes a raw RGB image of any size and names one of the folders.
    classifier = mlflow.pyfunc.load_model(result.classifier_uri)
    red = np.zeros((40, 24, 3), np.uint8)
    red[..., 0] = 255
    [answer] = classifier.predict([red])
    assert answer.class_name in {"red", "green", "blue"}
    assert answer.class_name == ["blue", "green", "red"][answer.class_index]
    assert sum(answer.probabilities.values()) == pytest.approx(1, abs=1e-6)


def test_too_few_images_are_refused_before_any_run_exists(tmp_path, store):
    """The splits are made before the run is opened: a folder too small for them leaves none."""
    write_image_folder(tmp_path / "images", {"a": 1, "b": 1})
    cfg = tiny_config(
        store, **{"data.dataset": "imagefolder", "data.data_dir": str(tmp_path / "images")}
    )
    with pytest.raises(UsageError, match="train/val/test splits need at least 3"):
        train(cfg)
    assert MlflowClient(store).get_experiment_by_name("tests") is None or run_statuses(store) == []


def test_progress_is_rich_on_a_terminal_and_plain_lines_otherwise(monkeypatch, store):
    from lightning.pytorch.callbacks import RichProgressBar

    from dlharness.callbacks.epoch_printer import EpochLinePrinter

    cfg = tiny_config(store)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    on_tty = build_trainer(cfg, "cpu", [])
    assert isinstance(on_tty.progress_bar_callback, RichProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    piped = build_trainer(cfg, "cpu", [])
    assert piped.progress_bar_callback is None
    assert any(isinstance(c, EpochLinePrinter) for c in piped.callbacks)
