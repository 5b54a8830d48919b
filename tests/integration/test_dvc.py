"""MLflow and DVC together, with real git and dvc: the example pipeline's runs name their data
version, and dlharness-reproduce brings an earlier run's data back from the remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness.data.data_version import data_version, experiment_tags
from dlharness.lineage import reproduce
from dlharness.training.config import load_config
from dlharness.training.train import train

from ..conftest import PYTHON, REPO, cli_env, empty_store, tiny_config
from .datafiles import write_image_folder

EXAMPLE = REPO / "examples" / "dvc-pipeline"
EPOCH_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc")


def sh(*command: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return sh(PYTHON, "-m", "dvc", *args, cwd=cwd, env=env)


def git_repo(folder: Path, env: dict[str, str]) -> None:
    sh("git", "init", "-q", cwd=folder, env=env)
    sh("git", "config", "user.email", "tests@example.com", cwd=folder, env=env)
    sh("git", "config", "user.name", "tests", cwd=folder, env=env)


def commit(folder: Path, env: dict[str, str], message: str) -> str:
    sh("git", "add", "-A", cwd=folder, env=env)
    sh("git", "commit", "-q", "-m", message, cwd=folder, env=env)
    return sh("git", "rev-parse", "HEAD", cwd=folder, env=env).strip()


def runs_by_start(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("dvc-pipeline")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def locked_md5(folder: Path, path: str = "data/images") -> str:
    lock = yaml.safe_load((folder / "dvc.lock").read_text())
    (out,) = [o for o in lock["stages"]["prepare"]["outs"] if o["path"] == path]
    return out["md5"]


def dvc_tags(run) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if k.startswith("dvc.")}


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in EPOCH_KEYS
    }


@pytest.mark.slow
def test_pipeline_runs_link_to_their_data_version_and_reproduce_from_the_remote(
    tmp_path, monkeypatch, capsys
):
    pipe, remote = tmp_path / "pipe", tmp_path / "remote"
    shutil.copytree(EXAMPLE, pipe)
    params = yaml.safe_load((pipe / "params.yaml").read_text())
    params["trainer"]["max_epochs"] = 2
    # What this test checks needs no ONNX copy of each model (≈1 s a run).
    params["tracker"] = {"onnx": False}
    (pipe / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = empty_store(tmp_path)
    # The stages run `python` and `dlharness-train` from PATH, as in an activated environment.
    env = cli_env(
        MLFLOW_TRACKING_URI=uri, PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"
    )
    git_repo(pipe, env)
    dvc("init", "-q", cwd=pipe, env=env)
    dvc("remote", "add", "-d", "storage", str(remote), cwd=pipe, env=env)
    first_commit = commit(pipe, env, "pipeline")
    client = MlflowClient(uri)

    # 1. `dvc repro`: prepare writes the digits as PNG files, train runs dlharness-train.
    dvc("repro", cwd=pipe, env=env)
    (first,) = runs_by_start(client)
    md5 = locked_md5(pipe)
    assert md5.endswith(".dir")
    assert dvc_tags(first) == {
        "dvc.data.md5": md5,
        "dvc.data.path": "data/images",
        "dvc.data.defined_in": "dvc.lock",
        "dvc.data.modified": "false",
        "dvc.data.git_commit": first_commit,
        "dvc.repo": str(pipe),
    }
    for record in first.inputs.dataset_inputs:
        assert {t.key: t.value for t in record.tags}["dvc.data.md5"] == md5
    # DVC's metrics and plots are the numbers the MLflow run holds.
    shown = json.loads(dvc("metrics", "show", "--json", cwd=pipe, env=env))
    metrics = shown[""]["data"]["metrics.json"]["data"]
    assert metrics["run_id"] == first.info.run_id
    for key, value in first.data.metrics.items():
        if not key.startswith("system/"):
            stage, name = key.split("/")
            assert metrics[stage][name] == value, key
    plots = json.loads(dvc("plots", "show", "--json", cwd=pipe, env=env))
    points = [p for p in plots["data"]["loss"][0]["content"]["data"]["values"]]
    for stage in ("train", "val"):
        curve = sorted(
            (int(p["epoch"]), float(p["loss"])) for p in points if p["filename"] == f"{stage}.csv"
        )
        assert curve == histories(client, first.info.run_id)[f"{stage}/loss"]
    run_1_commit = commit(pipe, env, "run 1")
    dvc("push", "-q", cwd=pipe, env=env)

    # 2. `dvc exp run -S`: a new MLflow run with the new value, the same data, and the exp's name.
    dvc("exp", "run", "-S", "optim.lr=0.01", cwd=pipe, env=env)
    second = runs_by_start(client)[-1]
    assert second.data.params["optim.lr"] == "0.01"
    assert second.data.tags["dvc.data.md5"] == md5
    assert second.data.tags["dvc.exp_baseline_rev"] == run_1_commit
    names = dvc("exp", "list", "--name-only", cwd=pipe, env=env).split()
    assert second.data.tags["dvc.exp_name"] in names
    assert "dvc.exp_name" not in first.data.tags
    commit(pipe, env, "lr 0.01")

    # 3. One image changed in the user's own folder: a new data hash, and the next run names it.
    sh(PYTHON, "prepare.py", "raw", cwd=pipe, env=env)
    changed = pipe / "raw" / "3" / "0003.png"
    Image.open(changed).point(lambda v: 255 - v).save(changed)
    stages = yaml.safe_load((pipe / "dvc.yaml").read_text())
    stages["stages"]["prepare"]["cmd"] = "python prepare.py --from raw data/images"
    stages["stages"]["prepare"]["deps"].append("raw")
    (pipe / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    # Only the prepare stage through DVC; the training by hand, in this process (a third
    # dlharness-train process would add its ≈8 s of imports and show nothing new).
    dvc("repro", "prepare", cwd=pipe, env=env)
    monkeypatch.chdir(pipe)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    train(load_config("params.yaml"))
    third = runs_by_start(client)[-1]
    new_md5 = locked_md5(pipe)
    assert new_md5 != md5
    assert third.data.tags["dvc.data.md5"] == new_md5
    commit(pipe, env, "own images, one changed")
    dvc("push", "-q", cwd=pipe, env=env)

    # 4. Back to run 1: its data is gone from the workspace and the cache, only on the remote.
    shutil.rmtree(pipe / ".dvc" / "cache")
    assert reproduce.main([first.info.run_id]) == 0
    copy = runs_by_start(client)[-1]
    assert copy.data.tags["dlharness.reproduces"] == first.info.run_id
    assert copy.data.tags["dvc.data.md5"] == md5
    assert copy.data.tags["dvc.data.git_commit"] == first_commit
    assert copy.data.tags["dvc.data.modified"] == "false"
    assert histories(client, copy.info.run_id) == histories(client, first.info.run_id)
    assert (
        f"reproduces {first.info.run_id}: every per-epoch metric equal" in capsys.readouterr().out
    )
    assert (pipe / ".dvc" / "cache").is_dir()  # pulled into the repository's cache
    # The temporary worktree is gone again.
    assert sh("git", "worktree", "list", cwd=pipe, env=env).count("\n") == 1

    # 5. A data version on neither the cache nor the remote: one line, exit 2, no new run.
    shutil.rmtree(pipe / ".dvc" / "cache")
    shutil.rmtree(remote)
    assert reproduce.main([first.info.run_id]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dlharness-reproduce: error: data version {md5} is neither in the DVC")
    assert "\n" not in err
    assert len(runs_by_start(client)) == 4  # the three of the pipeline and the copy


def test_a_dvc_added_folder_its_subfolder_and_a_local_change(tmp_path):
    env = cli_env()
    git_repo(tmp_path, env)
    dvc("init", "-q", cwd=tmp_path, env=env)
    write_image_folder(tmp_path / "data" / "shapes", {"a": 3, "b": 3})
    dvc("add", "-q", "data/shapes", cwd=tmp_path, env=env)
    recorded = yaml.safe_load((tmp_path / "data" / "shapes.dvc").read_text())["outs"][0]["md5"]

    version = data_version(tmp_path / "data" / "shapes" / "a")
    assert version.md5 == recorded
    assert (version.path, version.subdir) == ("data/shapes", "a")
    assert version.defined_in == "data/shapes.dvc"
    assert version.git_commit is None  # nothing committed yet
    assert not version.modified

    image = next((tmp_path / "data" / "shapes" / "b").iterdir())
    Image.open(image).rotate(90).save(image)
    changed = data_version(tmp_path / "data" / "shapes")
    assert changed.md5 == recorded
    assert changed.modified
    assert changed.tags()["dvc.data.modified"] == "true"
    assert data_version(tmp_path) is None  # the repository itself is no tracked output


def test_a_run_outside_dvc_has_no_dvc_tags_and_cannot_be_reproduced(tmp_path, capsys):
    folder = tmp_path / "images"
    write_image_folder(folder, {"a": 12, "b": 12})
    uri = empty_store(tmp_path)
    cfg = tiny_config(
        uri,
        **{
            "data.dataset": "imagefolder",
            "data.data_dir": str(folder),
            "data.image_size": 8,
            "trainer.max_epochs": 1,
            "tracker.onnx": False,
        },
    )
    result = train(cfg)
    run = MlflowClient(uri).get_run(result.run_id)
    assert not [k for k in run.data.tags if k.startswith("dvc.")]
    for record in run.inputs.dataset_inputs:
        assert [t.key for t in record.tags] == ["mlflow.data.context"]

    capsys.readouterr()  # the training's own output
    assert reproduce.main([result.run_id, "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == (
        f"dlharness-reproduce: error: run {result.run_id} records no DVC data version "
        "(its data was not a DVC-tracked folder)\n"
    )


def test_dvc_exp_run_environment_becomes_tags():
    environ = {"DVC_EXP_NAME": "fresh-oak", "DVC_EXP_BASELINE_REV": "abc123", "DVC_ROOT": "/x"}
    assert experiment_tags(environ) == {
        "dvc.exp_name": "fresh-oak",
        "dvc.exp_baseline_rev": "abc123",
    }
    assert experiment_tags({}) == {}
