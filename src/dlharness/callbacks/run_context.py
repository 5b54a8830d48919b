"""What a run used, logged once when fitting starts: machine, software, source, data, model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from typing_extensions import override

from dlharness.data import ClassificationDataModule
from dlharness.tracking.datasets import log_datasets, log_sample_grid, training_samples
from dlharness.tracking.environment import (
    collect_environment,
    environment_tags,
    git_state,
)
from dlharness.tracking.installed_packages import installed_requirements
from dlharness.tracking.run import set_run_tags
from dlharness.tracking.worker import TrackingWorker


class RunContextLogger(L.Callback):
    """Tags and files that describe the run's context, logged when `fit` starts.

    Environment and GPU tags (`env.*`, `gpu.*`, CUDA/cuDNN/driver versions, package versions,
    host), `git.dirty` beside MLflow's own commit tag, `requirements.txt` with every installed
    version, the model's type and size, and a dataset record per split with a grid of
    training samples.

    Args:
        worker: Runs the MLflow calls off the training thread.
        run_id: The MLflow run to log into.
        accelerator: The resolved accelerator (`cpu`, `gpu`, `mps`).
        source_dir: A folder inside the source checkout whose git state is recorded.
        client: The client to write with (a `SpoolingClient` keeps writes through an outage);
            by default MLflow's for the current tracking URI.
    """

    def __init__(
        self,
        worker: TrackingWorker,
        run_id: str,
        accelerator: str,
        source_dir: Path,
        client: MlflowClient | None = None,
    ) -> None:
        if accelerator not in ("cpu", "gpu", "mps"):
            raise ValueError(f"accelerator must be cpu, gpu or mps, got {accelerator!r}")
        self.worker = worker
        self.run_id = run_id
        self.accelerator = accelerator
        self.source_dir = source_dir
        self.client = client or MlflowClient()

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        devices, precision = trainer.num_devices, str(trainer.precision)
        self.worker.submit("environment tags", self._log_environment, devices, precision)
        self.worker.submit("source and requirements", self._log_source)
        net = getattr(pl_module, "net", pl_module)
        spec = pl_module.hparams.get("net_spec", {})
        model_tags = {
            "model.type": str(spec.get("name", type(net).__name__)),
            "model.class": type(net).__name__,
            "model.parameters": str(sum(p.numel() for p in net.parameters())),
        }
        self.worker.submit("model tags", set_run_tags, self.run_id, model_tags, self.client)
        datamodule = trainer.datamodule
        if isinstance(datamodule, ClassificationDataModule):
            self.worker.submit(
                "dataset records", log_datasets, self.client, self.run_id, datamodule
            )
            # Gathered here: torch work on the tracking thread would slow training down.
            images, captions = training_samples(datamodule)
            title = f"{datamodule.cfg.dataset}: training samples as the network sees them"
            self.worker.submit(
                "training sample grid",
                log_sample_grid,
                self.client,
                self.run_id,
                images,
                captions,
                title,
            )

    def _log_environment(self, devices: int, precision: str) -> None:
        env = collect_environment(self.accelerator, devices, precision)
        set_run_tags(self.run_id, environment_tags(env), self.client)

    def _log_source(self) -> None:
        client = self.client
        client.log_text(self.run_id, installed_requirements(), "requirements.txt")
        state = git_state(self.source_dir)
        if state is None:
            return
        tags = {"git.dirty": str(state.dirty).lower()}
        # MLflow sets the commit itself when the entry point lives in the checkout; a notebook
        # or test runner entry point leaves it unset.
        if MLFLOW_GIT_COMMIT not in client.get_run(self.run_id).data.tags:
            tags[MLFLOW_GIT_COMMIT] = state.commit
        set_run_tags(self.run_id, tags, self.client)
