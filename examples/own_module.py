"""Your own LightningModule and DataModule, tracked in MLflow by one callback.

    python examples/own_module.py                         # trains, tracked in ./mlflow.db
    python examples/own_module.py --resume RUN_ID --max-epochs 20   # continue that run
    python examples/own_module.py --devices 2 --strategy ddp        # two CPU processes

Nothing here comes from dlharness but `MlflowTracking` and `checkpoint_path`: copy the file and
replace the module and data with yours. The data are scikit-learn's bundled 8×8 digits, so it
runs anywhere without a download.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy

from dlharness import MlflowTracking, checkpoint_path


class DigitsData(L.LightningDataModule):
    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # logged as params by MlflowTracking

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        n_val = int(len(y) * self.hparams.val_fraction)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set = random_split(
            TensorDataset(x, y), [len(y) - n_val, n_val], generator=generator
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitClassifier(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, on_epoch=True)
        # The convention MlflowTracking reads for the per-epoch confusion matrix.
        return {"preds": logits, "target": y}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue this run from its checkpoint")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else MLflow's")
    args = parser.parse_args()

    L.seed_everything(0, workers=True)
    tracking = MlflowTracking(
        run_id=args.resume,
        tracking_uri=args.tracking_uri,
        experiment_name="own-module",
        monitor="val_loss",
        class_names=[str(d) for d in range(10)],
    )
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        callbacks=[tracking],
        logger=False,
        deterministic=True,
    )
    # Resuming: the run's latest stored checkpoint, downloaded and verified.
    ckpt = checkpoint_path(args.resume, tracking_uri=args.tracking_uri) if args.resume else None
    trainer.fit(DigitClassifier(), datamodule=DigitsData(), ckpt_path=ckpt)
    if trainer.is_global_zero:
        print(f"run {tracking.run.run_id}: best epoch {tracking.best_epoch}")


if __name__ == "__main__":
    main()
