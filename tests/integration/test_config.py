from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlharness.data import DATAMODULES
from dlharness.errors import UsageError
from dlharness.sweeps.sweep_config import load_sweep
from dlharness.tracking.params import flatten
from dlharness.training.config import (
    DATASETS,
    TrainConfig,
    load_config,
    parse_devices,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_yaml_equals_builtin_defaults():
    assert load_config(CONFIGS / "default.yaml") == TrainConfig()


SWEEP_FILES = {"sweep.yaml"}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in SWEEP_FILES),
    ids=lambda p: p.name,
)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.dataset in DATASETS


def test_the_shipped_sweep_file_loads(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # its base path is written from the repository root
    sweep = load_sweep(CONFIGS / "sweep.yaml")
    assert sweep.base == Path("configs/default.yaml")
    assert set(sweep.distributions) == {"optim.lr"}
    assert sweep.fixed == {"trainer.max_epochs": 10}


def test_every_dataset_choice_has_a_datamodule():
    assert set(DATAMODULES) == set(DATASETS)


def test_overrides_beat_yaml_and_tags_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ntracking:\n  tags:\n    team: vision\n")
    cfg = load_config(path, {"optim.lr": 0.01, "tracking.tags": {"author": "ana"}})
    assert cfg.optim.lr == 0.01
    assert cfg.tracking.tags == {"team": "vision", "author": "ana"}
    assert cfg.trainer.max_epochs == TrainConfig().trainer.max_epochs


def test_yaml_ints_become_floats_and_precision_a_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1\ntrainer:\n  precision: 32\n  devices: 1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.precision == "32"
    assert cfg.trainer.devices == 1


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("optim:\n  learning_rate: 0.1\n", "unknown config key 'optim.learning_rate'"),
        ("bogus: 1\n", "valid keys here: data, model, optim, seed, tracker, tracking, trainer"),
        ("data:\n  batch_size: many\n", "'data.batch_size' must be int"),
        ("data:\n  batch_size: true\n", "'data.batch_size' must be int"),
        ("data: 3\n", "'data' must be a section"),
        ("optim:\n  lr: .nan\n", "optim.lr must be a positive number"),
        ("optim:\n  lr: -0.1\n", "optim.lr must be a positive number"),
        ("data:\n  batch_size: 0\n", "data.batch_size must be a positive number"),
        ("trainer:\n  max_epochs: 0\n", "trainer.max_epochs must be a positive number"),
        (
            "data:\n  dataset: imagenet\n",
            "not one of: digits, mnist, fashion_mnist, cifar10, imagefolder",
        ),
        ("model:\n  name: vit\n", "not one of: cnn, resnet18"),
        ("optim:\n  optimizer: lion\n", "not one of: adam, adamw, sgd"),
        ("trainer:\n  precision: 8\n", "not one of: 32, 16-mixed, bf16-mixed"),
        ("trainer:\n  devices: two\n", "trainer.devices 'two' is not valid"),
        ("data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n", "must leave a training split"),
        ("tracker:\n  monitor: val/top5\n", "tracker.monitor 'val/top5' is not one of: val/loss"),
        ("tracker:\n  mode: lowest\n", "tracker.mode 'lowest' is not one of: min, max"),
        ("tracker:\n  checkpoint_every_n_epochs: 0\n", "must be a positive number"),
        ("tracker:\n  keep_last_checkpoints: -1\n", "must be a positive number"),
        ("optim: [1, 2\n", "YAML syntax error at line"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_bad_yaml_values_are_refused_with_the_fix(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_gives_dotted_keys_for_every_leaf():
    flat = flatten(TrainConfig().to_dict())
    assert flat["optim.lr"] == TrainConfig().optim.lr
    assert flat["data.dataset"] == "digits"
    assert flat["seed"] == 42
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_config_round_trips_through_yaml():
    cfg = load_config(None, {"optim.lr": 0.02, "tracking.tags": {"a": "b"}})
    assert load_config(None, flatten(yaml.safe_load(cfg.to_yaml()))) == cfg


@pytest.mark.parametrize(
    ("given", "expected"), [("auto", "auto"), ("2", 2), (1, 1), ("-1", -1), ("0,1", [0, 1])]
)
def test_parse_devices(given, expected):
    assert parse_devices(given) == expected


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrainConfig().resolved_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert TrainConfig().resolved_tracking_uri() == "sqlite:///env.db"
    flagged = load_config(None, {"tracking.tracking_uri": "sqlite:///flag.db"})
    assert flagged.resolved_tracking_uri() == "sqlite:///flag.db"
