"""The typed run configuration: dataclasses, YAML loading, overrides and validation.

One `TrainConfig` describes a whole run. It is built from the dataclass defaults, then a YAML
file, then CLI overrides (dotted paths such as ``optim.lr``), and validated at once so that a
bad value stops the program before any data is read or any MLflow run is opened.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dlharness.errors import UsageError
from dlharness.tracking.store_access import DEFAULT_TRACKING_URI

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "imagefolder")
MODELS = ("cnn", "resnet18")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine")
ACCELERATORS = ("auto", "cpu", "gpu", "mps")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
# "ddp" starts one process per device (re-running the command) and joins them with
# torch.distributed: gloo on CPU, NCCL on GPUs. "auto" is Lightning's choice (ddp for >1 device).
STRATEGIES = ("auto", "ddp")
MONITORABLE = tuple(
    f"{stage}/{name}"
    for stage in ("val", "train")
    for name in ("loss", "acc", "precision", "recall", "f1", "auroc")
)
MODES = ("min", "max")
AUGMENTATIONS = ("none", "crop_flip")
TAG_KEY = re.compile(r"[\w\-. /]+")
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][\w\-.]*")
# Each key is declared once, by `setting(...)`: default, help, choices, its flag and whether a
# resume may change it. Where and how long the run trains and what it logs on the side may
# change; every other key (data, network, optimiser, seed, precision) would not continue the
# same training, and a resume refuses a change to it. The CLI's flags, validation of choices,
# `--resume`'s help, the resume check and docs/configuration.md are derived from these.
HELP = "help"
CHOICES = "choices"
FLAG = "flag"
CHANGES_ON_RESUME = "changes_on_resume"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    resume: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config key's one declaration. A bool's flag is a switch to the other value."""
    metadata = {HELP: help, CHOICES: choices, FLAG: flag, CHANGES_ON_RESUME: resume}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class DataConfig:
    dataset: str = setting("digits", help="data set", choices=DATASETS, flag="--dataset")
    data_dir: str = setting(
        "data",
        help="data root (torchvision sets live in sub-folders), or the image folder itself",
        flag="--data-dir",
        resume=True,
    )
    download: bool = setting(
        False,
        help="allow downloading mnist/fashion_mnist/cifar10 into data_dir",
        flag="--download",
        resume=True,
    )
    batch_size: int = setting(64, help="samples per batch", flag="--batch-size")
    num_workers: int = setting(
        0, help="data-loader worker processes", flag="--num-workers", resume=True
    )
    # For torchvision sets, whose test split is fixed, val_fraction is taken from the official
    # training split and test_fraction unused.
    val_fraction: float = setting(0.15, help="fraction of the whole set for validation")
    test_fraction: float = setting(
        0.15, help="fraction of the whole set for testing (digits, imagefolder)"
    )
    # imagefolder needs one because its files may differ in size.
    image_size: int | None = setting(
        None, help="square side in pixels images are resized to; null keeps the set's own size"
    )
    # A batch is then one indexing op, with no per-sample collation and no host-to-device copy;
    # for sets that fit in the device's memory (CIFAR-10: 0.6 GB).
    on_device: bool = setting(
        False,
        help="keep every split as tensors on the training device, read and transformed once",
        flag="--data-on-device",
        resume=True,
    )
    augment: str | None = setting(
        None,
        help="training-split augmentation: crop_flip is a random crop after padding by an "
        "eighth of the side and a horizontal flip; null: crop_flip for cifar10, none otherwise",
        choices=AUGMENTATIONS,
        flag="--augment",
    )
    skip_bad_images: bool = setting(
        False,
        help="imagefolder: train on the rest when files cannot be read as images, and record "
        "them in the run, instead of refusing the folder",
        flag="--skip-bad-images",
    )


@dataclass
class ModelConfig:
    name: str = setting("cnn", help="network", choices=MODELS, flag="--model")
    width: int = setting(
        32, help="channels of the small CNN's first conv stage, doubled at each downsampling"
    )
    dropout: float = setting(0.1, help="dropout before the classifier head, in [0, 1)")


@dataclass
class OptimConfig:
    optimizer: str = setting("adam", help="optimizer", choices=OPTIMIZERS, flag="--optimizer")
    lr: float = setting(0.003, help="learning rate", flag="--lr")
    weight_decay: float = setting(0.0001, help="weight decay")
    momentum: float = setting(0.9, help="momentum (sgd only)")
    scheduler: str = setting(
        "cosine", help="learning-rate schedule", choices=SCHEDULERS, flag="--scheduler"
    )
    warmup_epochs: int = setting(
        0,
        help="epochs of linear learning-rate warm-up (from lr/(N+1) to lr) before the schedule",
        flag="--warmup-epochs",
    )


@dataclass
class TrainerConfig:
    max_epochs: int = setting(20, help="epochs to train", flag="--max-epochs", resume=True)
    accelerator: str = setting(
        "auto", help="device kind", choices=ACCELERATORS, flag="--accelerator", resume=True
    )
    devices: int | str = setting(
        "auto", help="auto, a count, or GPU ids like 0,1", flag="--devices", resume=True
    )
    precision: str = setting("32", help="numeric precision", choices=PRECISIONS, flag="--precision")
    strategy: str = setting(
        "auto",
        help="ddp: one process per device, metrics reduced across them",
        choices=STRATEGIES,
        flag="--strategy",
        resume=True,
    )
    num_nodes: int = setting(
        1, help="machines in a multi-node DDP job", flag="--num-nodes", resume=True
    )
    deterministic: bool = setting(True, help="Lightning's deterministic algorithms")
    # Faster convolutions on tensor-core GPUs (with 16/bf16-mixed).
    channels_last: bool = setting(
        False,
        help="NHWC weights and batches, for tensor-core GPUs",
        flag="--channels-last",
        resume=True,
    )
    # Compiled at the first batches of each shape and mode, faster after that. Checkpoints and
    # logged models are the same either way.
    compile: bool = setting(
        False,
        help="run the network through torch.compile; pays off on long GPU runs",
        flag="--compile",
        resume=True,
    )
    gradient_clip_val: float | None = setting(
        None, help="clip gradients to this norm (Lightning's)", flag="--gradient-clip-val"
    )
    accumulate_grad_batches: int = setting(
        1,
        help="sum the gradients of N batches per optimiser step (Lightning's)",
        flag="--accumulate-grad-batches",
    )


@dataclass
class TrackingConfig:
    tracking_uri: str | None = setting(
        None,
        help="MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db",
        flag="--tracking-uri",
        resume=True,
    )
    experiment: str = setting("dlharness", help="MLflow experiment name", flag="--experiment")
    run_name: str | None = setting(
        None, help="MLflow run name; null: MLflow's", flag="--run-name", resume=True
    )
    tags: dict[str, str] = setting(  # noqa: RUF009 (a field())
        help="MLflow run tags (--tag KEY=VALUE, repeatable)",
        flag="--tag",
        resume=True,
        default_factory=dict,
    )
    autolog: bool = setting(True, help="mlflow.pytorch.autolog alongside the tracking callback")
    system_metrics: bool = setting(
        True,
        help="MLflow's sampler of CPU, memory, disk, network and (with NVML) GPU use, as "
        "system/* metrics",
        flag="--no-system-metrics",
        resume=True,
    )
    register_model: str | None = setting(
        None,
        help="register the best model under this name, alias 'candidate'",
        flag="--register",
        resume=True,
    )
    spool_dir: str = setting(
        "mlflow-spool",
        help="where writes wait while the tracking server does not answer, a folder per run "
        "(replayed by dlharness-sync FOLDER/RUN_ID)",
    )


@dataclass
class TrackerConfig:
    """The epoch tracker: what is logged beyond autolog, and the checkpoint policy."""

    checkpoint_every_n_epochs: int = setting(
        1,
        help="log a resumable checkpoint every N epochs (and the last)",
        flag="--checkpoint-every",
    )
    keep_last_checkpoints: int | None = setting(
        5,
        help="checkpoints kept: the last K plus the best; null keeps all",
        flag="--keep-checkpoints",
        resume=True,
    )
    monitor: str = setting(
        "val/loss", help="the metric that picks the best epoch", choices=MONITORABLE
    )
    mode: str = setting("min", help="whether monitor is better low or high", choices=MODES)
    plots: bool = setting(
        True,
        help="loss/metric curves and the validation confusion matrix, re-drawn every epoch",
        resume=True,
    )
    onnx: bool = setting(True, help="log an ONNX export of the best model", resume=True)
    logged_models: bool = setting(
        True,
        help="each stored checkpoint an MLflow LoggedModel (the experiment's Models tab), its "
        "epoch's metrics linked to it and to the split's dataset",
        resume=True,
    )
    early_stop_patience: int | None = setting(
        None,
        help="stop after N validation epochs without an improvement of tracker.monitor by "
        "more than min_delta; null trains every epoch",
        flag="--early-stop-patience",
        resume=True,
    )
    min_delta: float = setting(
        0.0, help="the least change of monitor that counts as an improvement", resume=True
    )


@dataclass
class TrainConfig:
    seed: int = setting(42, help="seed for splits, init, shuffling", flag="--seed")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resolved_tracking_uri(self) -> str:
        return (
            self.tracking.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or DEFAULT_TRACKING_URI
        )


@dataclass(frozen=True)
class Key:
    """One config key as declared: its dotted name, type and `setting(...)` metadata."""

    dotted: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    flag: str | None
    changes_on_resume: bool

    @property
    def value_type(self) -> type:
        """The type a flag's text converts to: int for `int | None`, str for `int | str`."""
        if typing.get_origin(self.type) is dict:
            return dict
        options = [t for t in typing.get_args(self.type) if t is not type(None)] or [self.type]
        return options[0] if len(options) == 1 else str


def declared_keys(config: Any = None, prefix: str = "") -> list[Key]:
    """Every key of the config with its declaration, in declaration order."""
    config = TrainConfig() if config is None else config
    hints = typing.get_type_hints(type(config))
    keys = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            keys += declared_keys(value, f"{prefix}{item.name}.")
            continue
        meta = item.metadata
        keys.append(
            Key(
                f"{prefix}{item.name}",
                hints[item.name],
                value,
                meta[HELP],
                meta[CHOICES],
                meta[FLAG],
                meta[CHANGES_ON_RESUME],
            )
        )
    return keys


def shown(value: Any) -> str:
    """A default as help and docs write it: none, off/on, or the value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value) if value != {} else "none"


def value_at(config: Any, dotted: str) -> Any:
    """The value of dotted key `dotted` in `config`."""
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] = ()
) -> TrainConfig:
    """Build a validated config from the defaults, an optional YAML file and dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(Path(path))
    for dotted, value in dict(overrides).items():
        set_dotted(data, dotted, value)
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UsageError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {path}: expected a mapping of sections, got {type(data).__name__}"
        )
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"config key '{part}' must be a section, got {child!r}")
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
        node[leaf] = {**node[leaf], **value}
    else:
        node[leaf] = value


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, Mapping):
        raise UsageError(f"config key '{prefix.rstrip('.')}' must be a section (a mapping)")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UsageError(
            f"unknown config key '{prefix}{unknown[0]}'; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _convert(option, value, key)
                except UsageError:
                    continue
        names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
        raise UsageError(f"config key '{key}' must be {names}, got {value!r}")
    if origin is dict:
        if not isinstance(value, Mapping):
            raise UsageError(f"config key '{key}' must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    # bool is an int subclass in Python; a YAML `true` must not pass as a batch size.
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"config key '{key}' must be {hint.__name__}, got {value!r}")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"{key} '{value}' is not one of: {', '.join(valid)}")


def _positive(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{key} must be a positive number, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Check every value whose type is right but whose content can still be wrong."""
    for key in declared_keys():
        value = value_at(cfg, key.dotted)
        if key.choices is not None and value is not None:
            _choice(key.dotted, value, key.choices)
    _positive("trainer.num_nodes", cfg.trainer.num_nodes)
    _positive("optim.lr", cfg.optim.lr)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("trainer.max_epochs", cfg.trainer.max_epochs)
    _positive("model.width", cfg.model.width)
    if cfg.data.image_size is not None:
        _positive("data.image_size", cfg.data.image_size)
    if cfg.data.num_workers < 0:
        raise UsageError(f"data.num_workers must be 0 or more, got {cfg.data.num_workers}")
    for key in ("weight_decay", "momentum"):
        value = getattr(cfg.optim, key)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"optim.{key} must be a finite number >= 0, got {value}")
    if not 0 <= cfg.model.dropout < 1:
        raise UsageError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    for key in ("val_fraction", "test_fraction"):
        value = getattr(cfg.data, key)
        if not 0 < value < 1:
            raise UsageError(f"data.{key} must be in (0, 1), got {value}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise UsageError("data.val_fraction + data.test_fraction must leave a training split (< 1)")
    if cfg.optim.warmup_epochs < 0:
        raise UsageError(f"optim.warmup_epochs must be 0 or more, got {cfg.optim.warmup_epochs}")
    if cfg.optim.warmup_epochs >= cfg.trainer.max_epochs:
        raise UsageError(
            f"optim.warmup_epochs {cfg.optim.warmup_epochs} leaves no epoch after the warm-up "
            f"of a {cfg.trainer.max_epochs}-epoch run; use fewer"
        )
    if cfg.trainer.gradient_clip_val is not None:
        _positive("trainer.gradient_clip_val", cfg.trainer.gradient_clip_val)
    _positive("trainer.accumulate_grad_batches", cfg.trainer.accumulate_grad_batches)
    if cfg.tracker.early_stop_patience is not None and cfg.tracker.early_stop_patience < 1:
        raise UsageError(
            f"tracker.early_stop_patience must be 1 or more, got {cfg.tracker.early_stop_patience}"
        )
    if not (math.isfinite(cfg.tracker.min_delta) and cfg.tracker.min_delta >= 0):
        raise UsageError(
            f"tracker.min_delta must be a finite number >= 0, got {cfg.tracker.min_delta}"
        )
    _positive("tracker.checkpoint_every_n_epochs", cfg.tracker.checkpoint_every_n_epochs)
    if cfg.tracker.keep_last_checkpoints is not None:
        _positive("tracker.keep_last_checkpoints", cfg.tracker.keep_last_checkpoints)
    if cfg.tracking.register_model is not None and not cfg.tracking.register_model.strip():
        raise UsageError("tracking.register_model must be a non-empty model name")
    parse_devices(cfg.trainer.devices)
    if not cfg.tracking.experiment.strip():
        raise UsageError("tracking.experiment must not be empty")
    for key in cfg.tracking.tags:
        if not key.strip():
            raise UsageError("tag keys must not be empty (use --tag key=value)")
        _check_tag_key(key)
    name = cfg.tracking.run_name
    if name is not None and ("/" in name or "\\" in name or ".." in name or not name.isprintable()):
        raise UsageError(
            f"tracking.run_name {name!r}: a run name may not contain '/', '\\', '..' "
            "or control characters"
        )
    model = cfg.tracking.register_model
    if model is not None and not REGISTERED_NAME.fullmatch(model):
        raise UsageError(
            f"tracking.register_model {model!r}: use letters, digits, '_', '-' and '.', "
            "starting with a letter or digit"
        )


def _check_tag_key(key: str) -> None:
    # MLflow's own rule for tag names, plus no '..' part: keys end up in paths of file stores.
    parts = re.split(r"[/\\]", key)
    if not TAG_KEY.fullmatch(key) or ".." in parts or key.startswith("/"):
        raise UsageError(
            f"tag key {key!r}: use letters, digits, '_', '-', '.', ' ' and '/', "
            "with no '..' part and no leading '/'"
        )


def parse_devices(devices: int | str) -> int | str | list[int]:
    """Turn ``auto`` / ``2`` / ``"0,1"`` into what `lightning.Trainer(devices=...)` takes."""
    text = str(devices).strip()
    if text == "auto":
        return "auto"
    try:
        if "," in text:
            ids = [int(part) for part in text.split(",") if part.strip()]
            if ids and all(i >= 0 for i in ids):
                return ids
        elif int(text) >= 1 or int(text) == -1:
            return int(text)
    except ValueError:
        pass
    raise UsageError(
        f"trainer.devices '{devices}' is not valid: "
        "use auto, a count (1, 2, -1 for all) or GPU ids like 0,1"
    )


# What a resume may change, from the keys' declarations.
SAFE_ON_RESUME = frozenset(key.dotted for key in declared_keys() if key.changes_on_resume)
