"""What a Lightning user expects of the harness: run names, early stopping, clipping and
accumulation, warm-up, `make ui`, `compare` with no arguments."""

from __future__ import annotations

import math
import re
import subprocess

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlharness.store.compare import main as compare_main
from dlharness.tracking.checkpointing.artifacts import stored_epochs
from dlharness.training.resume import prepare_resume
from dlharness.training.train import build_trainer, train

from ..conftest import REPO, tiny_config

QUICK = {"tracker.plots": False, "tracker.onnx": False, "tracking.system_metrics": False}
RUN_NAME = re.compile(r"^[a-z]+-[a-z]+-\d{1,3}$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(store, an early-stopped run, a run with clipping, accumulation and warm-up), both with
    the same seed and no run name."""
    from ..conftest import make_store

    uri = make_store(tmp_path_factory.mktemp("options"))
    # No epoch can improve val/loss by 10: the first sets the best, the next exhausts patience 1.
    stopped = train(
        tiny_config(
            uri,
            **QUICK,
            **{
                "trainer.max_epochs": 5,
                "tracker.early_stop_patience": 1,
                "tracker.min_delta": 10.0,
            },
        )
    )
    shaped = train(
        tiny_config(
            uri,
            **QUICK,
            **{
                "trainer.max_epochs": 4,
                "trainer.gradient_clip_val": 0.5,
                "trainer.accumulate_grad_batches": 2,
                "optim.warmup_epochs": 2,
            },
        )
    )
    return uri, stopped.run_id, shaped.run_id


def test_two_runs_with_the_same_seed_get_different_names(runs):
    uri, first, second = runs
    client = MlflowClient(uri)
    names = [client.get_run(run_id).info.run_name for run_id in (first, second)]
    assert names[0] != names[1]
    assert all(RUN_NAME.match(name) for name in names), names


def test_early_stopping_stops_says_why_and_resumes_with_more_patience(runs):
    uri, run_id, _ = runs
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [0, 1]
    assert run.data.tags["dlharness.stopped_epoch"] == "1"
    assert "did not improve" in run.data.tags["dlharness.stop_reason"]
    assert stored_epochs(client, run_id) == [0, 1]

    point = prepare_resume(run_id, None, {"tracker.early_stop_patience": 10}, uri)
    train(point.config, point)
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert steps == [0, 1, 2, 3, 4]
    assert (
        client.get_run(run_id).data.tags["dlharness.resumed_with.tracker.early_stop_patience"]
        == "10"
    )


def test_clipping_and_accumulation_reach_the_trainer_and_the_params(runs):
    uri, _, run_id = runs
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["trainer.gradient_clip_val"] == "0.5"
    assert params["trainer.accumulate_grad_batches"] == "2"
    cfg = tiny_config(
        uri, **{"trainer.gradient_clip_val": 0.5, "trainer.accumulate_grad_batches": 2}
    )
    trainer = build_trainer(cfg, "cpu", [])
    assert (trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (0.5, 2)


def test_cudnn_picks_its_fastest_algorithms_only_when_determinism_is_off(store):
    before = torch.backends.cudnn.benchmark
    try:
        for deterministic in (True, False):
            build_trainer(tiny_config(store, **{"trainer.deterministic": deterministic}), "cpu", [])
            assert torch.backends.cudnn.benchmark is (not deterministic)
    finally:
        torch.backends.cudnn.benchmark = before


def test_warm_up_rates_follow_the_formula(runs):
    """lr · (e + 1) / (W + 1) for the W warm-up epochs, then the cosine over the rest."""
    uri, _, run_id = runs
    lr, warmup, epochs = 0.003, 2, 4
    expected = [lr * (e + 1) / (warmup + 1) for e in range(warmup)] + [
        lr * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        for e in range(warmup, epochs)
    ]
    history = MlflowClient(uri).get_metric_history(run_id, "train/lr")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert logged == pytest.approx(expected, rel=1e-6)


def test_compare_without_arguments_shows_the_default_experiment(logged_default_run, capsys):
    _, result, _, run = logged_default_run
    capsys.readouterr()
    assert compare_main(["--tracking-uri", result.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert run.info.run_name in out or result.run_id[:8] in out


def test_make_ui_opens_the_default_store():
    done = subprocess.run(
        ["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db" in done.stdout
