"""The sweep file: what a hyperparameter sweep searches, read and checked before any run exists."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlharness.errors import UsageError
from dlharness.training.config import MONITORABLE, TrainConfig, load_config, read_yaml

METHODS = ("tpe", "random", "grid")
GOALS = ("maximize", "minimize")
PRUNERS = ("median", "hyperband", "none")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
TOP_KEYS = ("base", "metric", "method", "trials", "parameters", "pruner", "seed")
PRUNER_KEYS = ("type", "warmup_epochs", "startup_trials")
# A sweep metric is judged every epoch: the training logs these at step = epoch.
EPOCH_METRICS = MONITORABLE


@dataclass(frozen=True)
class Distribution:
    kind: str
    low: float
    high: float


@dataclass
class SweepConfig:
    """A checked sweep file.

    Attributes:
        path: The sweep file itself (logged to the parent run).
        base: The training config every trial starts from (None: the built-in defaults).
        metric: The metric judged, a per-epoch key such as ``val/acc``.
        goal: ``maximize`` or ``minimize``.
        method: ``tpe``, ``random`` or ``grid``.
        trials: Trials in the whole study, across restarts and workers.
        choices: Parameters drawn from a list of values (a grid's axes).
        distributions: Parameters drawn from a range.
        fixed: Values every trial gets.
        pruner: ``median``, ``hyperband`` or ``none``.
        warmup_epochs: Epochs a trial always trains before it can be pruned.
        startup_trials: Finished trials the median pruner waits for before pruning.
        seed: The sampler's seed.
    """

    path: Path
    base: Path | None
    metric: str
    goal: str
    method: str
    trials: int
    choices: dict[str, list[Any]] = field(default_factory=dict)
    distributions: dict[str, Distribution] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    warmup_epochs: int = 1
    startup_trials: int = 2
    seed: int = 0

    @property
    def maximize(self) -> bool:
        return self.goal == "maximize"

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.choices.values())

    def search_space(self) -> dict[str, str]:
        """Each searched parameter as readable text, for the parent run's params."""
        space = {key: f"one of {values}" for key, values in self.choices.items()}
        for key, dist in self.distributions.items():
            space[key] = f"{dist.kind}({dist.low}, {dist.high})"
        return space


def _fail(path: Path, message: str) -> UsageError:
    return UsageError(f"sweep file {path}: {message}")


def _is_config_key(dotted: str) -> bool:
    node: Any = TrainConfig()
    for part in dotted.split("."):
        if not hasattr(node, "__dataclass_fields__") or part not in node.__dataclass_fields__:
            return False
        node = getattr(node, part)
    return not hasattr(node, "__dataclass_fields__")


def _check_value(path: Path, base: Path | None, key: str, value: Any) -> None:
    """A value the training config accepts for `key`, or the config's own one-line reason."""
    try:
        load_config(base, {key: value})
    except UsageError as exc:
        raise _fail(path, f"parameters.{key}: {exc}") from None


def _number(path: Path, key: str, spec: dict[str, Any], bound: str) -> float:
    value = spec.get(bound)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, f"parameters.{key}: {bound} must be a number, got {value!r}")
    return float(value)


def _parameter(sweep: SweepConfig, key: str, spec: Any) -> None:
    path = sweep.path
    if not _is_config_key(key):
        raise _fail(path, f"parameters.{key} is not a key of the training config")
    if not isinstance(spec, dict):
        _check_value(path, sweep.base, key, spec)
        sweep.fixed[key] = spec
        return
    if "values" in spec:
        values = spec["values"]
        if set(spec) != {"values"} or not isinstance(values, list):
            raise _fail(path, f"parameters.{key}: give either values: [...] or a distribution")
        if not values:
            raise _fail(path, f"parameters.{key}: values is empty")
        for value in values:
            _check_value(path, sweep.base, key, value)
        sweep.choices[key] = values
        return
    kind = spec.get("distribution")
    if kind not in DISTRIBUTIONS:
        raise _fail(
            path,
            f"parameters.{key}: distribution {kind!r} unknown; valid: {', '.join(DISTRIBUTIONS)}",
        )
    unknown = set(spec) - {"distribution", "min", "max"}
    if unknown:
        raise _fail(path, f"parameters.{key}: unknown key {sorted(unknown)[0]!r}; valid: min, max")
    low, high = _number(path, key, spec, "min"), _number(path, key, spec, "max")
    if not low < high:
        raise _fail(path, f"parameters.{key}: min {low:g} must be below max {high:g}")
    if kind == "log_uniform" and low <= 0:
        raise _fail(path, f"parameters.{key}: log_uniform needs min > 0, got {low:g}")
    if kind == "int_uniform" and not (low.is_integer() and high.is_integer()):
        raise _fail(path, f"parameters.{key}: int_uniform needs whole min and max")
    for bound in (low, high):
        _check_value(path, sweep.base, key, int(bound) if kind == "int_uniform" else bound)
    sweep.distributions[key] = Distribution(kind, low, high)


def load_sweep(path: str | os.PathLike) -> SweepConfig:
    """Read and check a sweep file; every problem is a one-line `UsageError`."""
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; valid: {', '.join(TOP_KEYS)}")
    base = Path(data["base"]) if data.get("base") is not None else None
    if base is not None and not base.is_file():
        raise _fail(path, f"base config {base} not found")
    metric = data.get("metric") or {}
    if not isinstance(metric, dict) or set(metric) - {"name", "goal"}:
        raise _fail(path, "metric must be {name: ..., goal: maximize|minimize}")
    name, goal = metric.get("name", "val/loss"), metric.get("goal")
    if name not in EPOCH_METRICS:
        raise _fail(
            path, f"metric.name {name!r} is not logged every epoch; valid: {', '.join(MONITORABLE)}"
        )
    goal = goal or ("minimize" if name.endswith("loss") else "maximize")
    if goal not in GOALS:
        raise _fail(path, f"metric.goal {goal!r} unknown; valid: {', '.join(GOALS)}")
    method = data.get("method", "tpe")
    if method not in METHODS:
        raise _fail(path, f"method {method!r} unknown; valid: {', '.join(METHODS)}")
    trials = data.get("trials")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise _fail(path, f"trials must be a whole number ≥ 1, got {trials!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(path, f"seed must be a whole number, got {seed!r}")
    pruner = data.get("pruner") or {"type": "none"}
    if not isinstance(pruner, dict) or set(pruner) - set(PRUNER_KEYS):
        raise _fail(path, f"pruner takes the keys {', '.join(PRUNER_KEYS)}")
    kind = pruner.get("type", "median")
    if kind not in PRUNERS:
        raise _fail(path, f"pruner.type {kind!r} unknown; valid: {', '.join(PRUNERS)}")
    sweep = SweepConfig(
        path=path,
        base=base,
        metric=name,
        goal=goal,
        method=method,
        trials=trials,
        pruner=kind,
        warmup_epochs=pruner.get("warmup_epochs", 1),
        startup_trials=pruner.get("startup_trials", 2),
        seed=seed,
    )
    for key in ("warmup_epochs", "startup_trials"):
        value = getattr(sweep, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(path, f"pruner.{key} must be a whole number ≥ 0, got {value!r}")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _fail(path, "parameters must be a mapping of training config keys")
    for key, spec in parameters.items():
        _parameter(sweep, str(key), spec)
    if not sweep.choices and not sweep.distributions:
        raise _fail(path, "parameters search nothing: give a key values: [...] or a distribution")
    if method == "grid":
        if sweep.distributions:
            key = next(iter(sweep.distributions))
            raise _fail(path, f"method grid needs values: [...]; parameters.{key} is a range")
        if trials > sweep.grid_size():
            raise _fail(
                path, f"trials {trials} exceeds the grid's {sweep.grid_size()} combinations"
            )
    return sweep
