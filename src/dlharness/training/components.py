"""The harness's data module and LightningModule, built from the config's sections."""

from __future__ import annotations

import dataclasses
from typing import Any

from dlharness.data import DATAMODULES, ClassificationDataModule, DataInfo
from dlharness.models.classifier import ClassifierModule
from dlharness.models.nets import build_net
from dlharness.training.config import DataConfig, ModelConfig, TrainConfig


def build_datamodule(cfg: DataConfig, seed: int) -> ClassificationDataModule:
    """The data set's module; an unset `augment` takes the data set's default."""
    module = DATAMODULES[cfg.dataset]
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "dataset"}
    values["augment"] = cfg.augment or module.default_augment
    return module(**values, seed=seed)


def net_spec(model: ModelConfig, info: DataInfo) -> dict[str, Any]:
    """What `build_net` builds: the configured network sized for the data."""
    return {
        "name": model.name,
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "image_size": info.image_size,
        "width": model.width,
        "dropout": model.dropout,
    }


def build_module(cfg: TrainConfig, datamodule: ClassificationDataModule) -> ClassifierModule:
    spec = net_spec(cfg.model, datamodule.info)
    module = ClassifierModule(
        build_net(spec),
        net_spec=spec,
        optimizer=cfg.optim.optimizer,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
        scheduler=cfg.optim.scheduler,
        warmup_epochs=cfg.optim.warmup_epochs,
        channels_last=cfg.trainer.channels_last,
    )
    if cfg.trainer.compile:
        module.compile_network()
    return module
