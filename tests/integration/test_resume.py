"""Resuming from logged checkpoints: exact, crash-proof, safe; real processes, real SQLite."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from dlharness.models.classifier import ClassifierModule
from dlharness.tracking.checkpointing.artifacts import (
    checkpoint_metadata,
    fetch_checkpoint,
    file_sha256,
    stored_epochs,
)
from dlharness.tracking.interruption import TrainingInterrupted
from dlharness.training.cli import main
from dlharness.training.config import load_config
from dlharness.training.resume import parse_target, prepare_resume
from dlharness.training.train import train

from ..conftest import PYTHON, REPO, SignalWindow, assert_nothing_running, cli_env, make_store
from .forked_cli import ForkedCli

TRAIN_SCRIPT = str(REPO / "scripts" / "train.py")
EPOCHS = 6
KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1", "val/auroc")
# Small enough for seconds per run, large enough (20 batches an epoch) to be killed mid-epoch.
TINY_YAML = """
data: {batch_size: 64}
model: {width: 8}
trainer: {max_epochs: 6, accelerator: cpu}
tracking: {system_metrics: false, experiment: resume}
tracker: {keep_last_checkpoints: null, onnx: false}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A store, the tiny config file, and two uninterrupted 6-epoch reference runs."""
    folder = tmp_path_factory.mktemp("resume")
    uri = make_store(folder, experiment="resume")
    config = folder / "tiny.yaml"
    config.write_text(TINY_YAML)
    references = {}
    for scheduler in ("cosine", "none"):
        cfg = load_config(config, {"tracking.tracking_uri": uri, "optim.scheduler": scheduler})
        references[scheduler] = train(cfg).run_id
    return folder, uri, config, references


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in KEYS
    }


def assert_one_value_per_epoch(client: MlflowClient, run_id: str, epochs: int = EPOCHS) -> None:
    for key, history in histories(client, run_id).items():
        assert [step for step, _ in history] == list(range(epochs)), key


def assert_same_training(
    client: MlflowClient, run_id: str, reference: str, tmp_path: Path, weights_atol: float = 0.0
) -> None:
    ours, theirs = histories(client, run_id), histories(client, reference)
    for key in KEYS:
        for (step, a), (_, b) in zip(ours[key], theirs[key], strict=True):
            assert abs(a - b) <= 1e-6, (key, step, a, b)
    last = EPOCHS - 1
    mine = torch.load(fetch_checkpoint(client, run_id, last, tmp_path / "a"), weights_only=True)
    ref = torch.load(fetch_checkpoint(client, reference, last, tmp_path / "b"), weights_only=True)
    for name, tensor in ref["state_dict"].items():
        assert torch.allclose(mine["state_dict"][name], tensor, rtol=0, atol=weights_atol), name


def start_training(
    folder: Path, uri: str, config: Path, *flags: str, marker: Path | None = None
) -> ForkedCli:
    """The CLI in its own process; with `marker`, from epoch 2 on (epoch 1 stored) the marker
    exists and each batch takes 50 ms longer, so a signal sent on seeing it lands in training."""
    callbacks = [SignalWindow(folder / "artifacts", 2, marker)] if marker else []
    return ForkedCli(["--config", str(config), "--tracking-uri", uri, *flags], folder, callbacks)


def wait_for(
    folder: Path,
    pattern: str,
    proc: ForkedCli | subprocess.Popen,
    ignore: set[Path],
    timeout_s: float = 240,
) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = set(folder.glob(pattern)) - ignore
        if found:
            return found.pop()
        output = proc.output() if isinstance(proc, ForkedCli) else "see its stderr"
        assert proc.poll() is None, f"training ended before {pattern}: {output}"
        time.sleep(0.01)
    raise AssertionError(f"{pattern} never appeared")


def run_id_of(record: Path) -> str:
    # <folder>/artifacts/<run id>/artifacts/checkpoints/epoch_N/checkpoint_metrics.json
    return record.parents[3].name


def resume(uri: str, *argv: str) -> int:
    return main(["--tracking-uri", uri, *argv])


# 3. Exact


def test_three_epochs_then_resume_to_six_equals_six_straight(lab, tmp_path, capsys):
    _, uri, config, references = lab
    client = MlflowClient(uri)
    first = train(
        load_config(
            config,
            {"tracking.tracking_uri": uri, "optim.scheduler": "none", "trainer.max_epochs": 3},
        )
    )
    capsys.readouterr()
    assert main(["--resume", first.run_id, "--max-epochs", "6", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed if line.startswith("epoch ")] == [
        "4/6",
        "5/6",
        "6/6",
    ]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dlharness.resumed_from_epoch"] == "2"
    assert run.data.tags["dlharness.resumed_with.trainer.max_epochs"] == "6"
    assert_one_value_per_epoch(client, first.run_id)
    assert_same_training(client, first.run_id, references["none"], tmp_path)
    # Evaluated at the end of both processes: the tables hold the last evaluation only.
    n_test = int(run.data.params["data.n_test"])
    predictions = mlflow.load_table("evaluation/predictions.json", run_ids=[first.run_id])
    assert len(predictions) == n_test
    per_class = mlflow.load_table("evaluation/per_class_metrics.json", run_ids=[first.run_id])
    assert per_class["support"].sum() == n_test
    assert sorted(t["path"] for t in json.loads(run.data.tags["mlflow.loggedArtifacts"])) == [
        "evaluation/per_class_metrics.json",
        "evaluation/predictions.json",
    ]
    final = torch.load(fetch_checkpoint(client, first.run_id, 5, tmp_path / "c"), weights_only=True)
    assert sorted(final["callbacks"]["MlflowTracking"]["history"]) == list(range(EPOCHS))
    # 6. The resumed run's checkpoints still load with MLflow's own loader.
    module = mlflow.pytorch.load_checkpoint(ClassifierModule, first.run_id, epoch=5)
    assert torch.equal(
        next(iter(module.state_dict().values())), next(iter(final["state_dict"].values()))
    )


def test_checkpoint_written_on_a_gpu_resumes_on_a_machine_without_one(lab, monkeypatch):
    """Checkpoints whose tensors are tagged cuda:0, as a GPU writes them, resume on the CPU."""
    _, uri, config, _ = lab
    client = MlflowClient(uri)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        first = train(load_config(config, {"tracking.tracking_uri": uri, "trainer.max_epochs": 2}))
    point = prepare_resume(first.run_id, None, {"trainer.max_epochs": 3}, uri)
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load meets here
        torch.load(point.checkpoint, weights_only=True)
    train(point.config, point)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert_one_value_per_epoch(client, first.run_id, epochs=3)


# 4. Crash-proof


@pytest.mark.parametrize("moment", ["mid-epoch", "after-checkpoint"])
def test_killed_training_resumes_with_one_value_per_epoch(lab, tmp_path, moment):
    folder, uri, config, references = lab
    client = MlflowClient(uri)
    # Epoch 1's record: stored while epoch 2 or 3 runs (the upload lags by up to one epoch).
    pattern = "artifacts/*/artifacts/checkpoints/epoch_1/checkpoint_metrics.json"
    earlier = set(folder.glob(pattern))
    marker = tmp_path / "in-epoch-2"
    proc = start_training(folder, uri, config, "--run-name", f"killed-{moment}", marker=marker)
    if moment == "mid-epoch":
        wait_for(marker.parent, marker.name, proc, ignore=set())
        time.sleep(0.3)  # 6 of epoch 2's 20 batches, at ≥ 50 ms each
    record = wait_for(folder, pattern, proc, ignore=earlier)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_id = run_id_of(record)
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so
    assert resume(uri, "--resume", run_id) == 0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_one_value_per_epoch(client, run_id)
    assert_same_training(client, run_id, references["cosine"], tmp_path)
    assert_nothing_running(uri)


class _ProcessEndsAfterTraining(Callback):
    """The process ends once the last epoch's checkpoint is stored, before the evaluation."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise RuntimeError("power cut")


def test_run_ended_after_its_last_checkpoint_resumes_to_its_evaluation(lab, capsys):
    """A stop that lands after the last epoch's checkpoint (a signal, a crash) leaves a run
    that the printed `--resume` completes; a finished run is complete and says how to go on."""
    _, uri, config, _ = lab
    client = MlflowClient(uri)
    cfg = load_config(config, {"tracking.tracking_uri": uri, "trainer.max_epochs": 2})
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg, callbacks=[_ProcessEndsAfterTraining()])
    run = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                             order_by=["start_time DESC"], max_results=1)[0]  # fmt: skip
    assert run.info.status == "FAILED"
    assert stored_epochs(client, run.info.run_id) == [0, 1]
    assert "test/acc" not in run.data.metrics
    assert resume(uri, "--resume", run.info.run_id) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert "test/acc" in run.data.metrics
    assert_one_value_per_epoch(client, run.info.run_id, epochs=2)
    capsys.readouterr()
    assert resume(uri, "--resume", run.info.run_id) == 2
    assert "pass --max-epochs above 2 to train longer" in capsys.readouterr().err
    assert_nothing_running(uri)


# Signals: SIGINT (Ctrl-C) and SIGTERM (pre-emption)


def assert_same_after_a_stop(
    client: MlflowClient,
    run_id: str,
    reference: str,
    tmp_path: Path,
    stopped_in: int,
    epochs: int = EPOCHS,
) -> None:
    """Same weights, same validation metrics; the train/* values of the epoch stopped in the
    middle average the batches after the resume only (Lightning does not checkpoint them)."""
    ours, theirs = histories(client, run_id), histories(client, reference)
    for key in KEYS:
        for (step, a), (_, b) in zip(ours[key], theirs[key], strict=True):
            partial = key in ("train/loss", "train/acc") and step == stopped_in
            assert partial or abs(a - b) <= 1e-6, (key, step, a, b)
    last = epochs - 1
    mine = torch.load(fetch_checkpoint(client, run_id, last, tmp_path / "a"), weights_only=True)
    ref = torch.load(fetch_checkpoint(client, reference, last, tmp_path / "b"), weights_only=True)
    for name, tensor in ref["state_dict"].items():
        assert torch.equal(mine["state_dict"][name], tensor), name


def test_sigterm_stores_the_state_ends_killed_and_prints_the_resume_command(lab, tmp_path):
    """Pre-emption: a real SIGTERM to the real CLI (Ctrl-C's SIGINT: the next test)."""
    signum = signal.SIGTERM
    folder, uri, config, references = lab
    client = MlflowClient(uri)
    pattern = "artifacts/*/artifacts/checkpoints/epoch_1/checkpoint_metrics.json"
    earlier = set(folder.glob(pattern))
    marker = tmp_path / "in-epoch-2"
    proc = start_training(folder, uri, config, "--run-name", f"signal-{signum.name}", marker=marker)
    wait_for(marker.parent, marker.name, proc, ignore=set())
    time.sleep(0.3)  # 6 of epoch 2's 20 batches, at ≥ 50 ms each
    record = wait_for(folder, pattern, proc, ignore=earlier)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    stderr = proc.output()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    run_id = run_id_of(record)
    assert client.get_run(run_id).info.status == "KILLED"
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"dlharness-train: interrupted by {signum.name}")
    assert f"Run {run_id} ended KILLED" in message

    # The printed arguments (the Ctrl-C test runs the real script and checks its program).
    command = shlex.split(message.split("resume: ", 1)[1])
    resumed = ForkedCli(command[command.index("--resume") :], folder)
    assert resumed.wait(timeout=300) == 0, resumed.output()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_one_value_per_epoch(client, run_id)
    where = re.search(r"at epoch (\d+)|after epoch (\d+)", message)
    stopped_in = int(where.group(1) or where.group(2))
    assert_same_after_a_stop(client, run_id, references["cosine"], tmp_path, stopped_in)
    assert_nothing_running(uri)


def test_ctrl_c_to_the_real_script_ends_killed_with_exit_130_and_the_state_stored(lab):
    folder, uri, config, _ = lab
    client = MlflowClient(uri)
    pattern = "artifacts/*/artifacts/checkpoints/epoch_1/checkpoint_metrics.json"
    earlier = set(folder.glob(pattern))
    argv = [PYTHON, TRAIN_SCRIPT, "--config", str(config), "--tracking-uri", uri]
    proc = subprocess.Popen(
        # 30 epochs: the signal, sent once epoch 1 is stored, lands in training on any machine.
        [*argv, "--run-name", "ctrl-c", "--max-epochs", "30"],
        cwd=folder,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    record = wait_for(folder, pattern, proc, ignore=earlier)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    run_id = run_id_of(record)
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("dlharness-train: interrupted by SIGINT")
    assert f"resume: {PYTHON} {TRAIN_SCRIPT} --resume {run_id} --tracking-uri {uri}" in message
    assert client.get_run(run_id).info.status == "KILLED"
    # The state at the stop is stored after epoch 1's: a later epoch, or epoch 1 again.
    stored = stored_epochs(client, run_id)
    assert stored[-1] >= 1
    assert checkpoint_metadata(client, run_id, stored[-1])["sha256"]


def signal_at(monkeypatch, step: str, epoch: int, batch_idx: int, signum: int) -> None:
    """Make the module's `step` send `signum` to this process at batch `batch_idx` of epoch
    `epoch` (not during the sanity check)."""
    original = getattr(ClassifierModule, step)

    def step_then_signal(module, batch, index):
        trainer = module.trainer
        if (trainer.current_epoch, index) == (epoch, batch_idx) and not trainer.sanity_checking:
            os.kill(os.getpid(), signum)
        return original(module, batch, index)

    monkeypatch.setattr(ClassifierModule, step, step_then_signal)


def test_ctrl_c_mid_epoch_stops_there_and_resumes_exactly(lab, tmp_path, monkeypatch):
    """A real SIGINT at batch 6 of epoch 1: the stored state continues with batch 7."""
    _, uri, config, references = lab
    client = MlflowClient(uri)
    signal_at(monkeypatch, "training_step", 1, 5, signal.SIGINT)
    cfg = load_config(config, {"tracking.tracking_uri": uri, "tracking.run_name": "mid-epoch"})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg)
    monkeypatch.undo()
    run_id = stopped.value.run_id
    assert stopped.value.signum == signal.SIGINT
    assert client.get_run(run_id).info.status == "KILLED"
    assert stored_epochs(client, run_id) == [0, 1]
    record = checkpoint_metadata(client, run_id, 1)
    assert (record["complete"], record["batches_done"]) == (False, 6)
    assert record["global_step"] == 20 + 6

    result = train(*resume_args(uri, run_id))
    assert result.run_id == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_one_value_per_epoch(client, run_id)
    assert_same_after_a_stop(client, run_id, references["cosine"], tmp_path, stopped_in=1)


def test_sigterm_during_validation_stores_the_epoch_before_lightning_can_stop(lab, monkeypatch):
    """Lightning's own SIGTERM handler would stop at the next validation batch with nothing
    stored; the harness's takes the signal and stops after the epoch, its checkpoint stored."""
    _, uri, config, _ = lab
    client = MlflowClient(uri)
    signal_at(monkeypatch, "validation_step", 1, 0, signal.SIGTERM)
    cfg = load_config(config, {"tracking.tracking_uri": uri, "tracking.run_name": "sigterm-val"})
    with pytest.raises(TrainingInterrupted, match="after epoch 1") as stopped:
        train(cfg)
    run_id = stopped.value.run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert stored_epochs(client, run_id) == [0, 1]
    assert checkpoint_metadata(client, run_id, 1)["complete"] is True


def test_augmented_run_stopped_mid_epoch_resumes_to_the_uninterrupted_one(
    lab, tmp_path, monkeypatch
):
    """Random crops and flips come from the sampler's generator: a resume redraws them."""
    _, uri, config, _ = lab
    client = MlflowClient(uri)
    # Three epochs, not the lab's six: the augmented loader is the slowest here (≈3 s an epoch).
    augmented = {
        "tracking.tracking_uri": uri, "data.augment": "crop_flip", "trainer.max_epochs": 3
    }  # fmt: skip
    reference = train(load_config(config, {**augmented, "tracking.run_name": "aug-ref"})).run_id
    signal_at(monkeypatch, "training_step", 1, 9, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(load_config(config, {**augmented, "tracking.run_name": "aug-stopped"}))
    monkeypatch.undo()
    run_id = stopped.value.run_id
    train(*resume_args(uri, run_id))
    assert_one_value_per_epoch(client, run_id, epochs=3)
    assert_same_after_a_stop(client, run_id, reference, tmp_path, stopped_in=1, epochs=3)
    assert client.get_run(run_id).data.params["augment"] == "crop_flip"


def resume_args(uri: str, run_id: str):
    point = prepare_resume(run_id, None, {"tracking.tracking_uri": uri}, uri, False)
    return point.config, point


# 2. --fork


def test_fork_starts_a_tagged_run_with_the_history_copied(lab):
    _, uri, _, references = lab
    client = MlflowClient(uri)
    parent = references["cosine"]
    before = client.get_run(parent)
    assert (
        resume(
            uri, "--resume", f"runs:/{parent}/checkpoints/epoch_1", "--fork", "--max-epochs", "8"
        )
        == 0
    )
    [child] = client.search_runs(
        [before.info.experiment_id], filter_string=f"tags.`dlharness.parent_run_id` = '{parent}'"
    )
    assert child.data.tags["dlharness.resumed_from_epoch"] == "1"
    assert child.info.status == "FINISHED"
    assert_one_value_per_epoch(client, child.info.run_id, epochs=8)
    parent_history = histories(client, parent)
    for key, values in histories(client, child.info.run_id).items():
        assert values[:2] == parent_history[key][:2], key  # copied, not recomputed
    after = client.get_run(parent)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert histories(client, parent) == parent_history
    assert stored_epochs(client, child.info.run_id) == list(range(2, 8))


# 1. CLI forms, 5. refusals


def test_resume_targets_are_parsed():
    run = uuid.uuid4().hex
    assert parse_target(run, None) == (run, None)
    assert parse_target(run, 3) == (run, 3)
    assert parse_target(f"runs:/{run}/checkpoints/epoch_4", None) == (run, 4)
    assert parse_target(f"runs:/{run}/checkpoints/epoch_4/checkpoint.pth", 4) == (run, 4)


@pytest.fixture(scope="module")
def finished(lab):
    """A finished 3-epoch run, whose checkpoints the refusal tests tamper with copies of."""
    _, uri, config, _ = lab
    return train(
        load_config(config, {"tracking.tracking_uri": uri, "trainer.max_epochs": 3})
    ).run_id


def refuse(capsys, uri: str, argv: list[str], expected: str) -> None:
    capsys.readouterr()
    try:
        code = resume(uri, *argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert expected in err, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def snapshot(client: MlflowClient, run_id: str) -> tuple:
    run = client.get_run(run_id)
    return run.info.status, run.info.end_time, len(client.get_metric_history(run_id, "val/loss"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--resume", "0" * 32], "not found"),
        (["--resume", "not-a-run"], "--resume expects a run id"),
        (
            ["--resume", "{run}", "--resume-epoch", "9", "--max-epochs", "12"],
            "no checkpoint for epoch 9; logged: 0, 1, 2",
        ),
        (
            ["--resume", "{run}", "--lr", "0.5", "--max-epochs", "5"],
            "optim.lr (--lr) cannot change when resuming",
        ),
        (
            ["--resume", "{run}", "--dataset", "mnist", "--max-epochs", "5"],
            "data.dataset (--dataset) cannot change when resuming",
        ),
        (
            ["--resume", "{run}", "--model", "resnet18", "--max-epochs", "5"],
            "model.name (--model) cannot change when resuming",
        ),
        (["--resume", "{run}"], "pass --max-epochs above 3"),
        (["--resume", "{run}", "--config", "x.yaml"], "--config cannot be combined with --resume"),
        (["--fork"], "--resume-epoch, --fork and --trust-checkpoint need --resume RUN"),
    ],
)
def test_bad_resume_requests_leave_the_run_untouched(lab, finished, capsys, argv, expected):
    _, uri, _, _ = lab
    client = MlflowClient(uri)
    before = snapshot(client, finished)
    refuse(capsys, uri, [a.replace("{run}", finished) for a in argv], expected)
    assert snapshot(client, finished) == before


def test_run_without_checkpoints_is_refused(lab, capsys):
    _, uri, _, _ = lab
    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("resume").experiment_id)
    client.set_terminated(run.info.run_id)
    refuse(capsys, uri, ["--resume", run.info.run_id], "has no logged checkpoints")


def stored_file(client: MlflowClient, run_id: str, epoch: int) -> Path:
    root = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    return root / f"checkpoints/epoch_{epoch}/checkpoint.pth"


def replace_checkpoint(client: MlflowClient, run_id: str, epoch: int, payload: bytes) -> None:
    """What an attacker with write access to the store could do: new bytes, matching sha256."""
    path = stored_file(client, run_id, epoch)
    path.write_bytes(payload)
    record_path = path.with_name("checkpoint_metrics.json")
    record = json.loads(record_path.read_text())
    record["sha256"] = file_sha256(path)
    record_path.write_text(json.dumps(record))


@pytest.fixture
def victim(lab):
    """A fresh finished 2-epoch run to tamper with."""
    _, uri, config, _ = lab
    return train(
        load_config(
            config, {"tracking.tracking_uri": uri, "trainer.max_epochs": 2, "tracker.plots": False}
        )
    ).run_id


def test_truncated_checkpoint_is_detected_and_named(lab, victim, capsys):
    _, uri, _, _ = lab
    client = MlflowClient(uri)
    path = stored_file(client, victim, 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(client, victim)
    refuse(
        capsys,
        uri,
        ["--resume", victim, "--max-epochs", "4"],
        "checkpoints/epoch_1/checkpoint.pth of run",
    )
    assert snapshot(client, victim) == before


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_a_code_payload_is_refused_and_not_run(lab, victim, capsys, tmp_path):
    _, uri, _, _ = lab
    client = MlflowClient(uri)
    marker = tmp_path / "payload-ran"
    honest = torch.load(stored_file(client, victim, 1), weights_only=True)
    honest["state_dict"]["evil"] = _Payload(marker)
    buffer = io.BytesIO()
    torch.save(honest, buffer)
    replace_checkpoint(client, victim, 1, buffer.getvalue())
    before = snapshot(client, victim)
    refuse(
        capsys,
        uri,
        ["--resume", victim, "--max-epochs", "4"],
        "refused: it holds objects other than tensors",
    )
    refuse(
        capsys,
        uri,
        ["--resume", victim, "--max-epochs", "4"],
        f"if you trust run {victim}, resume it with --trust-checkpoint",
    )
    assert not marker.exists()
    assert snapshot(client, victim) == before


def test_checkpoint_naming_an_instantiator_is_refused(lab, victim, capsys, tmp_path):
    _, uri, _, _ = lab
    client = MlflowClient(uri)
    marker = tmp_path / "instantiated"
    state = torch.load(stored_file(client, victim, 1), weights_only=True)
    state["hyper_parameters"]["_instantiator"] = "os.system"
    state["hyper_parameters"]["command"] = f"touch {marker}"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    replace_checkpoint(client, victim, 1, buffer.getvalue())
    refuse(capsys, uri, ["--resume", victim, "--max-epochs", "4"], "name an _instantiator")
    assert not marker.exists()
    # The owner's opt-in loads the file as it is and resumes from it (a fit reads no
    # _instantiator: only Lightning's load_from_checkpoint would construct it).
    assert resume(uri, "--resume", victim, "--max-epochs", "3", "--trust-checkpoint") == 0
    assert MlflowClient(uri).get_run(victim).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(victim, "val/loss")] == [0, 1, 2]
    assert not marker.exists()


def test_prepare_resume_returns_the_verified_checkpoint(lab, finished):
    _, uri, _, _ = lab
    point = prepare_resume(finished, None, {"trainer.max_epochs": 5}, uri)
    try:
        assert point.epoch == 2
        assert point.config.trainer.max_epochs == 5
        assert point.config.tracking.tracking_uri == uri
        recorded = checkpoint_metadata(MlflowClient(uri), finished, 2)["sha256"]
        assert file_sha256(point.checkpoint) == recorded
    finally:
        point.cleanup()
    assert not point.scratch.exists()
