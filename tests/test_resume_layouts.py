"""Data held on the device and NHWC weights, trained and resumed: the same training as the
plain layout.

At torch's default thread count, where the two layouts' sums agree to 1e-6 (with one thread,
as the other test files run, they are 1e-4 apart by epoch 3); the other resume tests run at
one thread, so that this file alone makes a test process run two.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dlharness.app.cli import main
from dlharness.app.config import load_config
from dlharness.app.train import train

from .conftest import make_store
from .test_resume import TINY_YAML, assert_one_value_per_epoch, assert_same_training

pytestmark = pytest.mark.usefixtures("torch_default_threads")


def test_data_on_device_in_nhwc_trains_and_resumes_the_same_model(tmp_path):
    """Tensors held whole by the loader and NHWC weights change speed, not the training.

    NHWC convolutions sum in another order: equal metrics, weights equal to 1e-5.
    """
    uri = make_store(tmp_path, experiment="resume")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML)
    client = MlflowClient(uri)
    overrides = {"tracking.tracking_uri": uri, "optim.scheduler": "none"}
    reference = train(load_config(config, overrides)).run_id
    fast = {"data.on_device": True, "trainer.channels_last": True}
    first = train(load_config(config, {**overrides, **fast, "trainer.max_epochs": 3}))
    resumed = ["--resume", first.run_id, "--max-epochs", "6", "--tracking-uri", uri]
    assert main([*resumed, "--data-on-device", "--channels-last"]) == 0
    params = client.get_run(first.run_id).data.params
    assert params["data.on_device"] == params["trainer.channels_last"] == "True"
    assert_one_value_per_epoch(client, first.run_id)
    assert_same_training(client, first.run_id, reference, tmp_path, weights_atol=1e-5)
