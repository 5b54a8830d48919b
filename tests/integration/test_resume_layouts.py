"""Data held on the device and NHWC weights, trained and resumed: the same training as the
plain layout.

At torch's default thread count, where the two layouts' sums agree to 1e-6 (with one thread,
as the other test files run, they are 1e-4 apart by epoch 3); the other resume tests run at
one thread, so that this file alone makes a test process run two.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.training.cli import main
from dlharness.training.config import load_config
from dlharness.training.train import train

from ..conftest import make_store
from .test_resume import TINY_YAML, assert_one_value_per_epoch, assert_same_training

pytestmark = pytest.mark.usefixtures("torch_default_threads")
# No dropout: compiled dropout draws from Inductor's own random stream, not eager torch's.
SCHEDULE = {"optim.scheduler": "none", "model.dropout": 0.0}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[str, Path, str]:
    """(store, config file, run id) of 6 epochs in the plain layout, uncompiled."""
    folder = tmp_path_factory.mktemp("layouts")
    uri = make_store(folder, experiment="resume")
    config = folder / "tiny.yaml"
    config.write_text(TINY_YAML)
    run = train(load_config(config, {"tracking.tracking_uri": uri, **SCHEDULE}))
    return uri, config, run.run_id


def test_data_on_device_in_nhwc_trains_and_resumes_the_same_model(plain, tmp_path):
    """Tensors held whole by the loader and NHWC weights change speed, not the training.

    NHWC convolutions sum in another order: equal metrics, weights equal to 1e-5.
    """
    uri, config, reference = plain
    client = MlflowClient(uri)
    fast = {"data.on_device": True, "trainer.channels_last": True}
    overrides = {"tracking.tracking_uri": uri, **SCHEDULE, **fast, "trainer.max_epochs": 3}
    first = train(load_config(config, overrides))
    resumed = ["--resume", first.run_id, "--max-epochs", "6", "--tracking-uri", uri]
    assert main([*resumed, "--data-on-device", "--channels-last"]) == 0
    params = client.get_run(first.run_id).data.params
    assert params["data.on_device"] == params["trainer.channels_last"] == "True"
    assert_one_value_per_epoch(client, first.run_id)
    assert_same_training(client, first.run_id, reference, tmp_path, weights_atol=1e-5)


@pytest.mark.slow
def test_compiled_network_trains_the_same_model_and_resumes_uncompiled(plain, tmp_path):
    """`--compile` (Inductor's generated C++ here) changes speed, not the training; its
    checkpoints hold the network's own keys, so a resume without it goes on from them."""
    uri, config, reference = plain
    client = MlflowClient(uri)
    torch._dynamo.reset()
    overrides = {"tracking.tracking_uri": uri, **SCHEDULE, "trainer.max_epochs": 3}
    first = train(load_config(config, {**overrides, "trainer.compile": True}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert client.get_run(first.run_id).data.params["trainer.compile"] == "True"
    resumed = ["--resume", first.run_id, "--max-epochs", "6", "--tracking-uri", uri]
    assert main(resumed) == 0
    assert_one_value_per_epoch(client, first.run_id)
    assert_same_training(client, first.run_id, reference, tmp_path, weights_atol=1e-5)
    model = mlflow.pytorch.load_model(f"runs:/{first.run_id}/model")
    assert type(model) is type(first.module.net)  # the plain network, not a compiled wrapper
