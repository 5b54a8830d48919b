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
# A field's metadata: a resume may change its value. Where and how long the run trains and what
# it logs on the side may change; every other key (data, network, optimiser, seed, precision)
# would not continue the same training, and a resume refuses a change to it.
CHANGES_ON_RESUME = "changes_on_resume"


def _resumable(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    return field(default=default, metadata={CHANGES_ON_RESUME: True}, **kwargs)


@dataclass
class DataConfig:
    dataset: str = "digits"
    # Root for torchvision data sets (they live in sub-folders) or the image folder itself.
    data_dir: str = _resumable("data")
    download: bool = _resumable(False)
    batch_size: int = 64
    num_workers: int = _resumable(0)
    # Fractions of the whole set for digits/imagefolder; for torchvision sets, whose test split
    # is fixed, val_fraction is taken from the official training split and test_fraction unused.
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # Square side in pixels that images are resized to; null keeps the data set's own size
    # (imagefolder needs one because its files may differ in size).
    image_size: int | None = None
    # Hold every split as tensors on the training device (read and transformed once, with
    # num_workers): a batch is then one indexing op, with no per-sample collation and no
    # host-to-device copy. For sets that fit in the device's memory (CIFAR-10: 0.6 GB).
    on_device: bool = _resumable(False)
    # Training-split augmentation: none, or crop_flip (random crop after padding by an eighth of
    # the side, and a horizontal flip); null takes the data set's default (crop_flip for
    # cifar10, none for the others).
    augment: str | None = None
    # imagefolder: leave out files that cannot be read as images (recorded in the run) instead
    # of refusing the folder.
    skip_bad_images: bool = False


@dataclass
class ModelConfig:
    name: str = "cnn"
    # Channels of the first conv stage of the small CNN; doubled at each downsampling.
    width: int = 32
    dropout: float = 0.1


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 0.003
    weight_decay: float = 0.0001
    # Used by sgd only.
    momentum: float = 0.9
    scheduler: str = "cosine"
    # Epochs of linear warm-up from lr/(N+1) to lr, before the schedule.
    warmup_epochs: int = 0


@dataclass
class TrainerConfig:
    max_epochs: int = _resumable(20)
    accelerator: str = _resumable("auto")
    devices: int | str = _resumable("auto")
    precision: str = "32"
    strategy: str = _resumable("auto")
    # Machines in a multi-node DDP job (each runs the same command; see the README).
    num_nodes: int = _resumable(1)
    deterministic: bool = True
    # NHWC weights and batches: faster convolutions on tensor-core GPUs (with 16/bf16-mixed).
    channels_last: bool = _resumable(False)
    # Run the network through torch.compile (Inductor): compiled at the first batches of each
    # shape and mode, faster after that. Checkpoints and logged models are the same either way.
    compile: bool = _resumable(False)
    # Lightning's own: clip gradients to this norm (null: no clipping); sum the gradients of
    # this many batches before each optimiser step.
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1


@dataclass
class TrackingConfig:
    # null: $MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = _resumable(None)
    experiment: str = "dlharness"
    run_name: str | None = _resumable(None)
    tags: dict[str, str] = _resumable(default_factory=dict)  # noqa: RUF009 (a field())
    autolog: bool = True
    # MLflow's sampler of CPU, memory, disk, network and (with NVML) GPU use, as system/* metrics.
    system_metrics: bool = _resumable(True)
    # Registered-model name for the best model; its new version gets the alias "candidate".
    register_model: str | None = _resumable(None)
    # Where writes go while the tracking server does not answer, one folder per run; replay
    # them with `dlharness-sync FOLDER/RUN_ID`.
    spool_dir: str = "mlflow-spool"


@dataclass
class TrackerConfig:
    """The epoch tracker: what is logged beyond autolog, and the checkpoint policy."""

    checkpoint_every_n_epochs: int = 1
    # Checkpoints kept in the run: the last K plus the best; null keeps all.
    keep_last_checkpoints: int | None = _resumable(5)
    monitor: str = "val/loss"
    mode: str = "min"
    # Loss/metric curves and the validation confusion matrix, re-drawn every epoch.
    plots: bool = _resumable(True)
    onnx: bool = _resumable(True)
    # Stop after this many validation epochs without an improvement of `monitor` by more than
    # `min_delta`; null trains every epoch.
    early_stop_patience: int | None = _resumable(None)
    min_delta: float = _resumable(0.0)


@dataclass
class TrainConfig:
    seed: int = 42
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


def dotted_fields(config: Any = None, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every key of the config as a dotted path, with its dataclass field."""
    config = TrainConfig() if config is None else config
    found = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            found += dotted_fields(value, f"{prefix}{item.name}.")
        else:
            found.append((f"{prefix}{item.name}", item))
    return found


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
    _choice("data.dataset", cfg.data.dataset, DATASETS)
    _choice("model.name", cfg.model.name, MODELS)
    _choice("optim.optimizer", cfg.optim.optimizer, OPTIMIZERS)
    _choice("optim.scheduler", cfg.optim.scheduler, SCHEDULERS)
    _choice("trainer.accelerator", cfg.trainer.accelerator, ACCELERATORS)
    _choice("trainer.precision", cfg.trainer.precision, PRECISIONS)
    _choice("trainer.strategy", cfg.trainer.strategy, STRATEGIES)
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
    if cfg.data.augment is not None:
        _choice("data.augment", cfg.data.augment, AUGMENTATIONS)
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
    _choice("tracker.monitor", cfg.tracker.monitor, MONITORABLE)
    _choice("tracker.mode", cfg.tracker.mode, MODES)
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


# What a resume may change, from the fields' declarations (`CHANGES_ON_RESUME`).
SAFE_ON_RESUME = frozenset(
    key for key, item in dotted_fields() if item.metadata.get(CHANGES_ON_RESUME)
)
