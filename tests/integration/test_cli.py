"""The command line: help, overrides, and bad input → one line, exit code 2, no RUNNING run."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from dlharness.training.cli import FLAGS, SWITCHES, build_parser, main

from ..conftest import PYTHON, REPO, assert_nothing_running, cli_env, make_store, run_statuses

TRAIN_SCRIPT = str(REPO / "scripts" / "train.py")


def run_main(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_shows_every_flag_with_its_default(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    flags = [f[0] for f in FLAGS] + ["--config", "--download", "--tag", "--print-config"]
    for flag in flags:
        assert flag in out, flag
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "print_config"):
            assert "(default:" in action.help, action.option_strings


def test_print_config_shows_the_overridden_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_epochs: 7\n")
    argv = [
        "--config",
        str(path),
        "--lr",
        "0.02",
        "--optimizer",
        "sgd",
        "--tag",
        "a=1",
        "--tag",
        "b=x=y",
        "--devices",
        "2",
        "--print-config",
    ]
    code, out, _ = run_main(argv, capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["trainer"]["max_epochs"] == 7
    assert printed["optim"] == {**printed["optim"], "lr": 0.02, "optimizer": "sgd"}
    assert printed["tracking"]["tags"] == {"a": "1", "b": "x=y"}
    assert printed["trainer"]["devices"] == "2"


def write_bad_configs(folder: Path) -> None:
    files = {
        "syntax.yaml": "optim: [1, 2\n",
        "unknown.yaml": "optim:\n  learning_rate: 1\n",
        "nan.yaml": "optim:\n  lr: .nan\n",
        "bool.yaml": "trainer:\n  max_epochs: true\n",
        "section.yaml": "data: 5\n",
        "list.yaml": "- 1\n- 2\n",
        "dropout.yaml": "model:\n  dropout: 1.5\n",
        "fractions.yaml": "data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n",
        "monitor.yaml": "tracker:\n  monitor: val/speed\n",
        "delta.yaml": "tracker:\n  min_delta: -1\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "empty").mkdir()


NO_GPU = not torch.cuda.is_available()
# (argv with {tmp} for the test's folder, what the one-line message must say). Each is refused
# before any MLflow run starts.
BAD_INPUTS = [
    (["--accelerator", "gpu"] if NO_GPU else ["--accelerator", "gpu", "--devices", "64"],
     "--accelerator cpu" if NO_GPU else "GPU(s) visible"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--model", "vit"], "invalid choice"),
    (["--optimizer", "lion"], "invalid choice"),
    (["--strategy", "fsdp"], "invalid choice"),
    (["--lr", "0"], "optim.lr (--lr) must be a positive number"),
    (["--lr=-0.1"], "must be a positive number"),
    (["--lr", "nan"], "must be a positive number"),
    (["--lr", "1e400"], "must be a positive number"),
    (["--batch-size", "0"], "data.batch_size (--batch-size) must be a positive number"),
    (["--batch-size", "many"], "invalid int value"),
    (["--seed", "4.5"], "invalid int value"),
    (["--max-epochs", "0"], "trainer.max_epochs (--max-epochs) must be a positive number"),
    (["--num-workers", "-1"], "data.num_workers (--num-workers) must be 0 or more"),
    (["--num-nodes", "0"], "trainer.num_nodes (--num-nodes) must be a positive number"),
    (["--checkpoint-every", "0"], "must be a positive number"),
    (["--keep-checkpoints", "0"], "must be a positive number"),
    (["--warmup-epochs", "20"], "optim.warmup_epochs (--warmup-epochs) 20 leaves no epoch after"),
    (["--warmup-epochs", "-1"], "must be 0 or more"),
    (["--gradient-clip-val", "0"], "trainer.gradient_clip_val (--gradient-clip-val) must be a positive"),
    (["--accumulate-grad-batches", "0"], "(--accumulate-grad-batches) must be a positive number"),
    (["--early-stop-patience", "0"], "tracker.early_stop_patience (--early-stop-patience) must be 1"),
    (["--augment", "rotate"], "invalid choice"),
    (["--dataset", "imagefolder", "--data-dir", "{tmp}/nope"], "does not exist"),
    (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], "pass --download"),
    (["--tag", "novalue"], "--tag expects KEY=VALUE"),
    (["--tag", "=x"], "--tag expects KEY=VALUE"),
    (["--tag", "../../etc/passwd=x"], "no '..' part"),
    (["--tag", "bad\nkey=x"], "tag key"),
    (["--run-name", "../outside"], "--run-name"),
    (["--run-name", "a/b"], "--run-name"),
    (["--register", "../model"], "--register"),
    (["--config", "{tmp}/missing.yaml"], "config file not found"),
    (["--config", "{tmp}/syntax.yaml"], "YAML syntax error"),
    (["--config", "{tmp}/unknown.yaml"], "unknown config key 'optim.learning_rate'"),
    (["--config", "{tmp}/nan.yaml"], "optim.lr (--lr) must be a positive number"),
    (["--config", "{tmp}/bool.yaml"], "'trainer.max_epochs' must be int"),
    (["--config", "{tmp}/section.yaml"], "'data' must be a section"),
    (["--config", "{tmp}/list.yaml"], "expected a mapping"),
    (["--config", "{tmp}/dropout.yaml"], "model.dropout must be in [0, 1)"),
    (["--config", "{tmp}/fractions.yaml"], "must leave a training split"),
    (["--config", "{tmp}/monitor.yaml"], "tracker.monitor 'val/speed' is not one of"),
    (["--config", "{tmp}/delta.yaml"], "tracker.min_delta must be a finite number >= 0"),
    (["--precision", "16-mixed", "--accelerator", "cpu"], "use bf16-mixed or 32"),
    (["--precision", "64"], "invalid choice"),
    (["--devices", "0,1", "--accelerator", "cpu"], "on CPU give a count"),
    (["--devices", "two"], "is not valid"),
    (["--resume-epoch", "3"], "--resume-epoch, --fork and --trust-checkpoint need --resume RUN"),
    (["--resume", "0123456789abcdef0123456789abcdef", "--config", "{tmp}/nan.yaml"],
     "--config cannot be combined with --resume"),
    (["--tracking-uri", "ftp://example.invalid/store"], "is not usable"),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_input_lab(tmp_path_factory) -> tuple[Path, str]:
    """One folder of bad config files and one store, shared: no case may add a run to it."""
    folder = tmp_path_factory.mktemp("bad-input")
    write_bad_configs(folder)
    return folder, make_store(folder)


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_exit_2_and_no_run(bad_input_lab, capsys, argv, expected):
    folder, store = bad_input_lab
    argv = [arg.replace("{tmp}", str(folder)) for arg in argv]
    if "--tracking-uri" not in argv:
        argv += ["--tracking-uri", store]
    code, out, err = run_main([*argv, "--experiment", "tests"], capsys)
    assert code == 2
    assert expected in err
    assert err.startswith("dlharness-") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out
    assert run_statuses(store) == []


@pytest.mark.parametrize(
    "uri",
    [
        lambda tmp: f"http://127.0.0.1:{closed_port()}",
        lambda tmp: f"sqlite:///{tmp}/no/such/dir/mlflow.db",
    ],
    ids=["server-down", "missing-folder"],
)
def test_unusable_tracking_uri_fails_before_training(tmp_path, capsys, uri):
    code, out, err = run_main(["--tracking-uri", uri(tmp_path)], capsys)
    assert code == 2
    assert err.startswith("dlharness-train: error:") and len(err.strip().splitlines()) == 1
    assert "epoch" not in out


def test_script_reports_bad_input_as_one_line_with_exit_2(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(
        [PYTHON, TRAIN_SCRIPT, "--tracking-uri", uri],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dlharness-train: error: cannot reach the MLflow tracking server at {uri} "
        "(ConnectionError); start it or pass another --tracking-uri"
    ]


def test_script_trains_into_the_default_store_with_plain_epoch_lines(tmp_path):
    """No URI given: sqlite:///mlflow.db in the working directory, as MLflow 3 itself defaults."""
    argv = [
        PYTHON,
        TRAIN_SCRIPT,
        "--max-epochs",
        "2",
        "--accelerator",
        "cpu",
        "--batch-size",
        "128",
        "--tag",
        "author=cli",
        "--run-name",
        "smoke",
    ]
    proc = subprocess.run(
        argv, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == ["1/2", "2/2"]
    assert "val/acc" in epoch_lines[0]
    last = proc.stdout.strip().splitlines()[-1]
    printed = shlex.split(last.removeprefix("compare epochs: "))
    assert printed[1:] == ["ui", "--backend-store-uri", "sqlite:///mlflow.db"]
    # Works as printed, outside an activated virtual environment too.
    shown = subprocess.run(
        [*printed, "--help"], env=cli_env(PATH="/usr/bin:/bin"), capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--backend-store-uri" in shown.stdout, shown.stderr
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("dlharness").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.tags["author"] == "cli"
    assert (tmp_path / "mlruns").is_dir()
    assert_nothing_running(uri)
    if (REPO / ".git").exists():
        # Run from the checkout: MLflow records the commit itself and dlharness only adds
        # the dirty flag.
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert run.data.tags["mlflow.source.git.commit"] == head
        assert run.data.tags["git.dirty"] in ("true", "false")


def test_console_script_entry_point_is_installed():
    script = Path(PYTHON).parent / "dlharness-train"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--tracking-uri" in proc.stdout


def test_readme_flag_table_names_every_flag():
    table = {
        match.group(1)
        for match in re.finditer(r"^\| `(--[a-z-]+)", (REPO / "README.md").read_text(), re.M)
    }
    switches = [switch[0] for switch in SWITCHES]
    flags = [flag[0] for flag in FLAGS] + switches + ["--config", "--tag", "--print-config"]
    flags += ["--metrics-file", "--plots-dir"]
    assert sorted(set(flags) - table) == []
