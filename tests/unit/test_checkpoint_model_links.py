"""Which dataset an epoch metric of a checkpoint model links to: each row a metric key."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric

from dlharness.tracking.checkpointing.logged_models import linked, model_name

DATASETS = {"train": ("digits-train", "aaa"), "val": ("digits-val", "bbb")}

LINKS = [
    ("val/acc", ("digits-val", "bbb")),
    ("val_loss", ("digits-val", "bbb")),  # Lightning's flat names
    ("train/loss", ("digits-train", "aaa")),
    ("train_loss_epoch", ("digits-train", "aaa")),
    ("test/acc", (None, None)),  # no test dataset logged: the model only
    ("valid_loss", (None, None)),  # a stage the run logged no dataset for
    ("epoch", (None, None)),
    ("lr", (None, None)),
]


@pytest.mark.parametrize(("key", "dataset"), LINKS)
def test_a_metric_links_to_the_model_and_its_stages_dataset(key, dataset):
    [metric] = linked([Metric(key, 0.5, 1, 3)], "m-1", DATASETS)
    assert (metric.key, metric.value, metric.step, metric.model_id) == (key, 0.5, 3, "m-1")
    assert (metric.dataset_name, metric.dataset_digest) == dataset


def test_without_datasets_every_metric_links_to_the_model_only():
    metrics = linked([Metric("val/acc", 0.9, 1, 0), Metric("val_loss", 0.1, 1, 0)], "m-2", {})
    assert [(m.model_id, m.dataset_name) for m in metrics] == [("m-2", None), ("m-2", None)]


def test_a_model_is_named_after_its_run_and_epoch():
    assert model_name("brisk-newt-118", 7) == "brisk-newt-118-epoch-7"
