"""On a CUDA GPU: bf16-mixed, NHWC and the data held on the device, through train and resume.

Skipped (with the reason shown) where torch sees no CUDA GPU; `scripts/gpu_check.sh` runs them
on a lent GPU machine.
"""

from __future__ import annotations

import subprocess

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.training.cli import main
from dlharness.training.train import train

from ..conftest import PYTHON, REPO, cli_env, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FAST_PATH = {
    "trainer.accelerator": "gpu",
    "trainer.precision": "bf16-mixed",
    "trainer.channels_last": True,
    "data.on_device": True,
}


def val_loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val/loss"))


def test_gpu_bf16_run_through_the_data_loader(store):
    result = train(
        tiny_config(store, **{"trainer.accelerator": "gpu", "trainer.precision": "bf16-mixed"})
    )
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.accelerator"] == "gpu"
    assert next(result.module.parameters()).device.type == "cuda"
    assert val_loss_steps(MlflowClient(store), result.run_id) == [0, 1]


def test_gpu_fast_path_tracks_every_epoch_and_logs_a_model_for_the_cpu(store, monkeypatch):
    # MLflow samples every 10 s by default: longer than this run.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    result = train(tiny_config(store, **FAST_PATH, **{"trainer.max_epochs": 3}))
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == "bf16-mixed"
    assert run.data.params["data.on_device"] == "True"
    assert run.data.tags["gpu.name"] == torch.cuda.get_device_name(0)
    # MLflow's NVML sampler: utilisation and memory of GPU 0.
    assert any(key.startswith("system/gpu_0_") for key in run.data.metrics), run.data.metrics
    assert val_loss_steps(client, result.run_id) == [0, 1, 2]
    assert next(result.module.parameters()).device.type == "cuda"

    logged = mlflow.pytorch.load_model(result.model_uri, map_location="cpu")
    assert next(logged.parameters()).device.type == "cpu"
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        on_gpu = result.module.net.eval()(images.cuda()).float().cpu()
        on_cpu = logged(images)
    # cuDNN convolutions use TF32 by default: close, not equal.
    torch.testing.assert_close(on_cpu, on_gpu, atol=0.02, rtol=0.02)


def test_gpu_checkpoint_resumes_on_the_gpu_and_on_a_machine_without_one(store, tmp_path):
    quiet = {"tracking.system_metrics": False, "tracker.onnx": False, "tracker.plots": False}
    first = train(tiny_config(store, **FAST_PATH, **quiet, **{"trainer.max_epochs": 2}))
    client = MlflowClient(store)

    assert main(["--resume", first.run_id, "--max-epochs", "3", "--tracking-uri", store]) == 0
    assert val_loss_steps(client, first.run_id) == [0, 1, 2]

    # CUDA hidden: the stored checkpoint's CUDA tensors must load onto the CPU.
    argv = [PYTHON, str(REPO / "scripts" / "train.py"), "--resume", first.run_id]
    argv += ["--max-epochs", "4", "--accelerator", "cpu", "--tracking-uri", store]
    done = subprocess.run(
        argv, cwd=tmp_path, env=cli_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dlharness.resumed_with.trainer.accelerator"] == "cpu"
    assert val_loss_steps(client, first.run_id) == [0, 1, 2, 3]


def test_compiled_gpu_fast_path_trains_with_cudnn_choosing(store):
    """`--compile` on the GPU (Triton kernels) with determinism off, the fast path of
    `scripts/bench.py`'s gpu_fast: it trains, and what it stores is the plain network's."""
    quiet = {"tracking.system_metrics": False, "tracker.onnx": False}
    fast = {"trainer.compile": True, "trainer.deterministic": False}
    result = train(tiny_config(store, **FAST_PATH, **quiet, **fast))
    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.compile"] == "True"
    assert torch.backends.cudnn.benchmark
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")
    )
    assert [step for step, _ in history] == [0, 1]
    assert history[1][1] < history[0][1]  # it learns
    logged = mlflow.pytorch.load_model(result.model_uri, map_location="cpu")
    assert type(logged) is type(result.module.net)
