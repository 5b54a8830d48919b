"""Checkpoint files written on the tracking thread from a copy taken on the training thread,
with hyperparameters reduced to what ``torch.load(weights_only=True)`` accepts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from dlharness.tracking.worker import TrackingWorker

# Where Lightning keeps the module's and the datamodule's `save_hyperparameters()` values in a
# checkpoint, and the type of an OmegaConf container holding them (a class: never plain data).
_HPARAMS_KEYS = (
    (L.LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, L.LightningModule.CHECKPOINT_HYPER_PARAMS_TYPE),
    (
        L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY,
        L.LightningDataModule.CHECKPOINT_HYPER_PARAMS_TYPE,
    ),
)
# The checkpoint's record of the hyperparameters left out: "hyper_parameters.optimizer" → repr.
LEFT_OUT_HPARAMS_KEY = "dlharness_hyperparameters_left_out"
# Characters of a left-out value's repr kept (a network's repr runs to pages).
_REPR_CHARS = 1000
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype,
                 torch.device, torch.Size)  # fmt: skip


class _NotPlainError(Exception):
    pass


def _plain(value: Any) -> Any:
    """`value` rebuilt of dicts, lists and tuples if its leaves are plain data, else raises."""
    if isinstance(value, _PLAIN_LEAVES):
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(key, (str, int)) for key in value):
            raise _NotPlainError
        return {key: _plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item) for item in value)
    raise _NotPlainError


def with_plain_hyperparameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with every hyperparameter that is not plain data left out (a network, an
    optimizer's `functools.partial`, a class: what a lightning-hydra-template module keeps with
    ``save_hyperparameters()``), and their reprs in `LEFT_OUT_HPARAMS_KEY`.

    The file then loads with ``weights_only=True``, and resumes: ``fit(ckpt_path=...)`` restores
    the states into the module the caller built; ``load_from_checkpoint(path, net=...)`` takes
    the objects as arguments, as Lightning asks for the ones in `save_hyperparameters(ignore=)`.
    """
    plain = dict(checkpoint)
    left_out: dict[str, str] = {}
    for key, type_key in _HPARAMS_KEYS:
        if key not in checkpoint:
            continue
        plain.pop(type_key, None)
        kept = {}
        for name, value in dict(checkpoint[key]).items():
            try:
                kept[name] = _plain(value)
            except _NotPlainError:
                left_out[f"{key}.{name}"] = repr(value)[:_REPR_CHARS]
        plain[key] = kept
    if left_out:
        plain[LEFT_OUT_HPARAMS_KEY] = left_out
    return plain


def snapshot(value: Any) -> Any:
    """`value` with every tensor in it copied to CPU memory (training goes on changing the
    originals in place), through dicts, lists and tuples, whose types are kept.

    Lightning's `apply_to_collection` does this too, but checks every one of a checkpoint's
    thousands of objects for dataclasses and more, on the training thread.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = copy.copy(value)  # keeps OrderedDict, defaultdict, AttributeDict
        for key, item in value.items():
            copied[key] = snapshot(item)
        return copied
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple):
        items = [snapshot(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class BackgroundCheckpointIO(CheckpointIO):
    """A strategy's `CheckpointIO` that writes the files under `folder` on the tracking worker,
    with plain hyperparameters only (`with_plain_hyperparameters`).

    For those, `save_checkpoint` returns once the tensors are copied and leaves `torch.save` to
    the worker: pickling and writing cost the training thread ten times the copy
    (docs/performance.md). Lightning's ``AsyncCheckpointIO`` does the
    same on a thread of its own; on the worker's queue the write runs before any job submitted
    after it, so an upload queued next finds the file complete. A write that fails is reported
    by the worker like any tracking job. Every other save, and all loading and removing, goes
    to the strategy's own `CheckpointIO` (say a user's ``ModelCheckpoint`` files).

    Args:
        worker: The tracking worker that writes the files.
        inner: The `CheckpointIO` the strategy had.
        folder: Where the tracking's own checkpoint files go.
    """

    def __init__(self, worker: TrackingWorker, inner: CheckpointIO, folder: Path) -> None:
        super().__init__()
        self.worker = worker
        self.inner = inner
        self.folder = folder.resolve()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not Path(path).resolve().is_relative_to(self.folder):
            self.inner.save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        plain = with_plain_hyperparameters(checkpoint)
        self.worker.submit("checkpoint write", torch.save, snapshot(plain), Path(path))

    @override
    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if map_location is None:
            return self.inner.load_checkpoint(path, weights_only=weights_only)
        return self.inner.load_checkpoint(path, map_location, weights_only)

    @override
    def remove_checkpoint(self, path: str | Path) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()
