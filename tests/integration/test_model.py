from __future__ import annotations

import traceback

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dlharness.models.classifier import ClassifierModule
from dlharness.models.nets import SmallCNN, build_net


def spec(name="cnn", in_channels=1, image_size=8, num_classes=10):
    return {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "image_size": image_size,
        "width": 8,
        "dropout": 0.0,
    }


@pytest.mark.parametrize(
    ("channels", "size", "pools"), [(1, 8, 2), (1, 28, 3), (3, 32, 3), (3, 4, 1)]
)
def test_small_cnn_is_sized_from_the_data(channels, size, pools):
    net = build_net(spec(in_channels=channels, image_size=size, num_classes=7))
    assert isinstance(net, SmallCNN)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == pools
    assert net(torch.randn(2, channels, size, size)).shape == (2, 7)


def test_resnet18_has_a_small_image_stem():
    net = build_net(spec(name="resnet18", in_channels=1, image_size=8, num_classes=4))
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "expected"),
    [
        ("sgd", "cosine", torch.optim.SGD),
        ("adamw", "none", torch.optim.AdamW),
        ("adam", "cosine", torch.optim.Adam),
    ],
)
def test_optimizer_and_schedule_follow_the_config(optimizer, scheduler, expected):
    module = ClassifierModule(
        net_spec=spec(), optimizer=optimizer, lr=0.05, scheduler=scheduler, momentum=0.8
    )
    trainer = L.Trainer(max_epochs=4, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    configured = module.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    assert type(opt) is expected
    assert opt.param_groups[0]["lr"] == 0.05
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8
    has_schedule = isinstance(configured, dict)
    assert has_schedule == (scheduler == "cosine")
    if has_schedule:
        # Cosine from the base rate to 0 over the trainer's 4 epochs.
        schedule = configured["lr_scheduler"]["scheduler"]
        rates = []
        for _ in range(5):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        half = 2**-0.5
        assert rates == pytest.approx(
            [0.05, 0.05 * (1 + half) / 2, 0.025, 0.05 * (1 - half) / 2, 0]
        )


def test_checkpoint_rebuilds_the_network_without_arguments(tmp_path):
    """The net is passed in, yet `load_from_checkpoint(path)` alone restores it (weights_only)."""
    net = build_net(spec())
    module = ClassifierModule(net, net_spec=spec(), lr=0.01)
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0
    )
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = ClassifierModule.load_from_checkpoint(path, weights_only=True)
    x = torch.randn(3, 1, 8, 8)
    module.eval(), restored.eval()
    assert torch.equal(module(x), restored(x))
    assert restored.hparams.lr == 0.01
    assert "net" not in restored.hparams


def test_every_fit_of_a_module_reports_its_epoch_metrics(tmp_path):
    """Metric objects are handed to Lightning once per epoch; a second fit starts at epoch 0."""
    from dlharness.training.components import build_datamodule, build_module
    from dlharness.training.config import load_config

    cfg = load_config(None, {"model.width": 8, "data.batch_size": 128})
    datamodule = build_datamodule(cfg.data, cfg.seed)
    module = build_module(cfg, datamodule)
    expected = {f"{stage}/{name}" for stage in ("train", "val")
                for name in ("loss", "acc", "precision", "recall", "f1", "auroc")}  # fmt: skip
    for _ in range(2):
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(module, datamodule=datamodule)
        assert expected | {"train/lr"} <= set(trainer.callback_metrics)


class _DeviceReads(TorchDispatchMode):
    """Counts ops that make the host wait for a device's result (a value read back, an output
    whose size depends on the data) issued from dlharness's per-batch code."""

    PER_BATCH = frozenset(
        ("_shared_step", "on_train_batch_start", "on_train_batch_end", "on_validation_batch_end")
    )
    READS = ("_local_scalar_dense", "nonzero", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(read in str(func) for read in self.READS):
            stack = traceback.extract_stack()
            ours = [f for f in stack if "dlharness" in f.filename and f.name in self.PER_BATCH]
            # torchmetrics tests logits against [0, 1] on the host for CPU tensors only; on a
            # device it keeps the test on the device (`torch.where`).
            cpu_only = any(f.name == "normalize_logits_if_needed" for f in stack)
            if ours and not cpu_only:
                # The line that asked, not torch's own frames below it.
                caller = [f for f in stack[:-1] if "site-packages/torch/" not in f.filename][-1]
                self.found.append(f"{func} in {ours[-1].name} ({caller.filename}:{caller.lineno})")
        return func(*args, **(kwargs or {}))


class _WatchEpoch(L.Callback):
    def __init__(self, reads: _DeviceReads) -> None:
        self.reads = reads

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.reads.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.reads.__exit__(None, None, None)


def test_batches_never_wait_for_the_device(tmp_path):
    """No training or validation batch of the module or of MlflowTracking reads a value back
    from the device (on a GPU each read stops the host from queueing the next batch): the
    metrics skip torchmetrics' input checks and the losses' NaN test."""
    from dlharness import MlflowTracking
    from dlharness.training.components import build_datamodule, build_module
    from dlharness.training.config import load_config

    cfg = load_config(None, {"model.width": 8, "data.batch_size": 128})
    datamodule = build_datamodule(cfg.data, cfg.seed)
    reads = _DeviceReads()
    tracking = MlflowTracking(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False
    )
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[_WatchEpoch(reads), tracking], default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(build_module(cfg, datamodule), datamodule=datamodule)
    assert reads.found == []


def test_epoch_loss_weighs_each_batch_by_its_samples_and_shows_a_nan():
    """The epoch's loss is the mean over samples (a short last batch counts for less), and a
    diverged batch makes it NaN rather than being dropped from it."""
    module = ClassifierModule(build_net(spec()), net_spec=spec())
    module.train_loss.update(torch.tensor(1.0), weight=3)
    module.train_loss.update(torch.tensor(3.0), weight=1)
    assert module.train_loss.compute().item() == 1.5
    module.val_loss.update(torch.tensor(float("nan")), weight=64)
    module.val_loss.update(torch.tensor(0.5), weight=64)
    assert torch.isnan(module.val_loss.compute())
