"""Comparing runs and epochs: three real trainings with different learning rates."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness.store.compare import main
from dlharness.training.config import load_config
from dlharness.training.train import train

from ..conftest import PYTHON, REPO, cli_env, make_store

LEARNING_RATES = (0.001, 0.003, 0.01)
METRICS = ("val/loss", "val/acc")


@pytest.fixture(scope="module")
def lrs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    uri = make_store(folder, experiment="lrs")
    runs = []
    for lr in LEARNING_RATES:
        cfg = load_config(
            None,
            {
                "tracking.tracking_uri": uri,
                "tracking.experiment": "lrs",
                "tracking.run_name": f"lr-{lr}",
                "tracking.system_metrics": False,
                "optim.lr": lr,
                "trainer.max_epochs": 3,
                "trainer.accelerator": "cpu",
                "data.batch_size": 128,
                "model.width": 8,
                "tracker.keep_last_checkpoints": None,
                "tracker.onnx": False,
            },
        )
        runs.append(train(cfg).run_id)
    return uri, runs


def run_compare(capsys, uri, *argv):
    capsys.readouterr()
    try:
        code = main(["--tracking-uri", uri, *argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_epoch_table_matches_the_metric_histories(lrs, capsys, tmp_path):
    uri, runs = lrs
    client = MlflowClient(uri)
    code, out, _ = run_compare(
        capsys,
        uri,
        "--experiment",
        "lrs",
        "--metrics",
        ",".join(METRICS),
        "--csv",
        str(tmp_path / "t.csv"),
    )
    assert code == 0
    for lr in LEARNING_RATES:
        assert f"lr-{lr}" in out
    rows = read_csv(tmp_path / "t.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for run_id in runs:
        for metric in METRICS:
            history = {m.step: m.value for m in client.get_metric_history(run_id, metric)}
            assert {int(r["epoch"]): float(r[f"{run_id}/{metric}"]) for r in rows} == history
            best = (min if metric.endswith("loss") else max)(
                history, key=lambda e: (history[e], -e)
            )
            assert [int(r["epoch"]) for r in rows if r[f"{run_id}/{metric}/best"] == "True"] == [
                best
            ]


def test_filter_selects_runs_with_mlflow_search_syntax(lrs, capsys, tmp_path):
    uri, runs = lrs
    path = tmp_path / "f.csv"
    code, _, _ = run_compare(
        capsys,
        uri,
        "--experiment",
        "lrs",
        "--filter",
        "params.`optim.lr` = '0.01'",
        "--csv",
        str(path),
    )
    assert code == 0
    columns = read_csv(path)[0].keys()
    assert {c.split("/")[0] for c in columns if c != "epoch"} == {runs[2]}


def test_run_ids_select_runs(lrs, capsys, tmp_path):
    uri, runs = lrs
    path = tmp_path / "ids.csv"
    assert run_compare(capsys, uri, runs[0], runs[1], "--csv", str(path))[0] == 0
    assert {c.split("/")[0] for c in read_csv(path)[0] if c != "epoch"} == {runs[0], runs[1]}


def test_plot_is_a_png_and_can_be_logged_to_a_run(lrs, capsys, tmp_path):
    uri, runs = lrs
    plot = tmp_path / "lrs.png"
    code, _, _ = run_compare(
        capsys, uri, "--experiment", "lrs", "--plot", str(plot), "--log-to", runs[0]
    )
    assert code == 0
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 600
    logged = [a.path for a in MlflowClient(uri).list_artifacts(runs[0], "comparisons")]
    assert logged == ["comparisons/lrs.png"]


def test_epochs_of_one_run_side_by_side(lrs, capsys, tmp_path):
    uri, runs = lrs
    strip = tmp_path / "epochs.png"
    code, out, _ = run_compare(
        capsys, uri, "--run", runs[1], "--epochs", "0,2", "--plot", str(strip)
    )
    assert code == 0
    assert "epoch 0" in out and "epoch 2" in out and "val/f1" in out
    history = {m.step: m.value for m in MlflowClient(uri).get_metric_history(runs[1], "val/acc")}
    assert f"{history[2]:.4f}" in out
    with Image.open(strip) as image:
        width, height = image.size
    single = next(
        a for a in MlflowClient(uri).list_artifacts(runs[1], "images") if a.path.endswith(".png")
    )
    with Image.open(
        MlflowClient(uri).download_artifacts(runs[1], single.path, str(tmp_path))
    ) as one:
        assert (width, height) == (2 * one.width, one.height)


def test_reevaluation_on_the_validation_split_matches_the_logged_metrics(lrs, capsys, tmp_path):
    uri, runs = lrs
    path = tmp_path / "eval.csv"
    code, _, _ = run_compare(
        capsys,
        uri,
        "--run",
        runs[2],
        "--epochs",
        "1,2",
        "--evaluate",
        "--split",
        "val",
        "--csv",
        str(path),
        "--plot",
        str(tmp_path / "e.png"),
    )
    assert code == 0
    client = MlflowClient(uri)
    rows = read_csv(path)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("val/loss", "val/acc", "val/f1", "val/auroc"):
            logged = {m.step: m.value for m in client.get_metric_history(runs[2], key)}
            assert float(row[key]) == pytest.approx(logged[int(row["epoch"])], abs=1e-5), key


def test_summary_sorts_runs_by_the_chosen_metric(lrs, capsys):
    uri, runs = lrs
    client = MlflowClient(uri)
    code, out, _ = run_compare(
        capsys, uri, "--experiment", "lrs", "--summary", "--metrics", "val/loss"
    )
    assert code == 0
    best = {r: min(m.value for m in client.get_metric_history(r, "val/loss")) for r in runs}
    order = sorted(runs, key=best.get)
    positions = [out.index(f"({r[:8]})") for r in order]
    assert positions == sorted(positions)
    assert "test/acc" in out and "best val/loss" in out and "device" in out
    assert f"{best[order[0]]:.4f}" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--experiment", "nope"], "no experiment 'nope'; experiments:"),
        (["0" * 32], "not found"),
        (["not-a-run"], "is not a run id"),
        (
            ["--experiment", "lrs", "--metrics", "val/top5"],
            "no run has metric 'val/top5'; metrics: test/acc",
        ),
        (["--run", "{run}", "--epochs", "9"], "has no epoch 9; epochs: 0..2"),
        (["--run", "{run}", "--epochs", "x"], "--epochs expects comma-separated epoch numbers"),
        (["--run", "{run}"], "--run needs --epochs"),
        (["--experiment", "lrs", "--log-to", "{run}"], "--log-to needs --plot"),
        (["--experiment", "lrs", "--epochs", "1"], "--epochs and --evaluate go with --run"),
        (["--experiment", "lrs", "--filter", "params.lr >>> 1"], "--filter:"),
        (["--split", "train"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(lrs, capsys, argv, expected):
    uri, runs = lrs
    code, _, err = run_compare(capsys, uri, *[a.replace("{run}", runs[0]) for a in argv])
    assert code == 2
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_store_is_named_and_not_created(tmp_path, capsys):
    absent = tmp_path / "mlflow.db"
    assert main(["--tracking-uri", f"sqlite:///{absent}"]) == 2
    assert f"no tracking store at {absent}" in capsys.readouterr().err
    assert not absent.exists()


def test_script_and_console_entry_point(lrs, tmp_path):
    uri, _ = lrs
    proc = subprocess.run(
        [
            PYTHON,
            str(REPO / "scripts" / "compare.py"),
            "--experiment",
            "lrs",
            "--tracking-uri",
            uri,
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lr-0.01" in proc.stdout
    entry = Path(PYTHON).parent / "dlharness-compare"
    assert subprocess.run([str(entry), "--help"], capture_output=True, timeout=60).returncode == 0
