"""Every stored checkpoint an MLflow 3 LoggedModel: listed, linked, retained, resumed from."""

from __future__ import annotations

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness import checkpoint_path
from dlharness.store import compare
from dlharness.tracking.checkpointing.artifacts import fetch_checkpoint, file_sha256, stored_epochs
from dlharness.tracking.checkpointing.logged_models import (
    BEST_TAG,
    EPOCH_TAG,
    LATEST_TAG,
    SHA256_TAG,
    checkpoint_models,
)
from dlharness.training.cli import main
from dlharness.training.resume import prepare_resume
from dlharness.training.train import train

from ..conftest import make_store, tiny_config


def models_of(client: MlflowClient, run_id: str):
    experiment_id = client.get_run(run_id).info.experiment_id
    return checkpoint_models(client, experiment_id, run_id)


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory):
    """A 4-epoch digits run keeping every checkpoint."""
    folder = tmp_path_factory.mktemp("logged-models")
    uri = make_store(folder)
    result = train(
        tiny_config(uri, **{"trainer.max_epochs": 4, "tracker.keep_last_checkpoints": None})
    )
    return uri, result.run_id, folder


def test_each_checkpoint_is_a_ready_model_with_its_epochs_metrics_on_the_val_split(four_epochs):
    uri, run_id, _ = four_epochs
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    models = models_of(client, run_id)
    assert sorted(models) == [0, 1, 2, 3] == stored_epochs(client, run_id)
    [val] = [d.dataset for d in run.inputs.dataset_inputs if d.tags[0].value == "val"]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "val/acc")}
    assert sorted(history) == [0, 1, 2, 3]  # the run's own chart: once per epoch
    outputs = {o.model_id: o.step for o in run.outputs.model_outputs}
    for epoch, model in models.items():
        assert model.status == "READY" and model.source_run_id == run_id
        assert outputs[model.model_id] == epoch and model.tags[EPOCH_TAG] == str(epoch)
        assert model.params["lr"] == "0.003"
        [acc] = [m for m in model.metrics if m.key == "val/acc"]
        assert (acc.value, acc.step, acc.model_id) == (history[epoch], epoch, model.model_id)
        assert (acc.dataset_name, acc.dataset_digest) == (val.name, val.digest)
        [loss] = [m for m in model.metrics if m.key == "train/loss"]
        assert loss.dataset_name.endswith("-train")
    # Latest and best are tagged on one model each (val/loss falls: the last is the best).
    assert [e for e, m in models.items() if LATEST_TAG in m.tags] == [3]
    best_epoch = int(run.data.tags["dlharness.best_checkpoint_epoch"])
    assert [e for e, m in models.items() if BEST_TAG in m.tags] == [best_epoch]


def test_search_logged_models_by_val_acc_names_the_best_epoch_and_its_file(four_epochs, tmp_path):
    uri, run_id, _ = four_epochs
    client = MlflowClient(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    [best] = client.search_logged_models(
        [experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND model_type = 'checkpoint'",
        order_by=[{"field_name": "metrics.val/acc", "ascending": False}],
        max_results=1,
    )
    history = {m.step: m.value for m in client.get_metric_history(run_id, "val/acc")}
    top = max(history.values())
    assert history[int(best.tags[EPOCH_TAG])] == top
    path = checkpoint_path(f"models:/{best.model_id}", tracking_uri=uri, dst=tmp_path / "best")
    assert file_sha256(path) == best.tags[SHA256_TAG]
    assert torch.load(path, weights_only=True)["epoch"] == int(best.tags[EPOCH_TAG])


def test_a_fork_resumed_from_a_model_equals_the_uninterrupted_run(four_epochs, tmp_path, capsys):
    uri, run_id, _ = four_epochs
    client = MlflowClient(uri)
    epoch_1 = models_of(client, run_id)[1].model_id
    # The CLI takes the model as --resume's target.
    assert main(["--resume", f"models:/{epoch_1}", "--fork", "--tracking-uri", uri,
                 "--print-config"]) == 0  # fmt: skip
    assert "max_epochs: 4" in capsys.readouterr().out
    point = prepare_resume(f"models:/{epoch_1}", None, {}, uri, fork=True)
    assert (point.run_id, point.epoch) == (run_id, 1)
    fork = train(point.config, point)
    straight = fetch_checkpoint(client, run_id, 3, tmp_path / "straight")
    resumed = fetch_checkpoint(client, fork.run_id, 3, tmp_path / "resumed")
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    assert sorted(models_of(client, fork.run_id)) == [2, 3]
    assert sorted(models_of(client, run_id)) == [0, 1, 2, 3]  # the source run keeps its own


def test_retention_deletes_the_models_of_dropped_checkpoints_and_a_resume_adds_no_duplicate(
    tmp_path,
):
    uri = make_store(tmp_path)
    client = MlflowClient(uri)
    result = train(
        tiny_config(uri, **{"trainer.max_epochs": 3, "tracker.keep_last_checkpoints": 2})
    )
    run_id = result.run_id
    assert sorted(models_of(client, run_id)) == stored_epochs(client, run_id) == [1, 2]
    experiment_id = client.get_run(run_id).info.experiment_id
    listed = client.search_logged_models([experiment_id], filter_string="model_type = 'checkpoint'")
    assert sorted(int(m.tags[EPOCH_TAG]) for m in listed) == [1, 2]  # none for the dropped one
    # Resumed from epoch 1 in the same run: epoch 2 is stored again, its model replaced.
    point = prepare_resume(run_id, 1, {"trainer.max_epochs": 4}, uri)
    train(point.config, point)
    models = models_of(client, run_id)
    assert sorted(models) == stored_epochs(client, run_id) == [2, 3]
    assert [e for e, m in models.items() if LATEST_TAG in m.tags] == [3]
    outputs = {o.model_id for o in client.get_run(run_id).outputs.model_outputs}
    assert {m.model_id for m in models.values()} <= outputs


def test_dlharness_compare_lists_the_checkpoints_best_first(four_epochs, capsys):
    uri, run_id, _ = four_epochs
    # The run named: the experiment also holds the fork another test makes.
    argv = [run_id, "--checkpoints", "--metrics", "val/acc,val/loss", "--tracking-uri", uri]
    assert compare.main(argv) == 0
    rows = re.findall(r"(m-[0-9a-f]+) │ [\w-]+ +│ +(\d+) │ +([0-9.]+) │", capsys.readouterr().out)
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, "val/acc")}
    assert len(rows) == 4
    assert [float(value) for _, _, value in rows] == sorted(
        (round(v, 4) for v in history.values()), reverse=True
    )
    models = models_of(MlflowClient(uri), run_id)
    assert all(models[int(epoch)].model_id == model_id for model_id, epoch, _ in rows)
