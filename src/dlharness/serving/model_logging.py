"""Logging a trained network as MLflow models: pytorch flavor, ONNX, the served classifier,
and the registry."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import torch
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from torch import nn

from dlharness.data import ClassificationDataModule
from dlharness.models import nets
from dlharness.serving.classifier_logging import ImagePreprocessing, log_classifier, pinned
from dlharness.tracking.spool import Spool, SpoolingClient

# The installed package's folder (the models' code, the run's source); found from here, not by
# importing the package, which imports this module.
PACKAGE_DIR = Path(__file__).resolve().parents[1]

CANDIDATE_ALIAS = "candidate"


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _cpu_copy(net: nn.Module) -> nn.Module:
    # Contiguous (NCHW) weights whatever the training layout: what a CPU loader expects.
    cpu_net = copy.deepcopy(net).to("cpu", memory_format=torch.contiguous_format)
    return cpu_net.float().eval()


def log_network(net: nn.Module, example_batch: torch.Tensor, name: str = "model") -> ModelInfo:
    """Log `net` (pytorch flavor, pickled) with a signature and an input example.

    The network's own classes ship with the model (`code_paths`), so loading it needs only
    the pinned packages, not an installed dlharness.
    """
    cpu_net = _cpu_copy(net)
    example = example_batch[:4].detach().to("cpu", torch.float32)
    with torch.no_grad():
        outputs = cpu_net(example)
    # MLflow warns that pickled models run code when loaded; that is the pytorch flavor's
    # trade-off for returning a real nn.Module, and the README's security notes say so.
    with _quiet("mlflow.pytorch"):
        return mlflow.pytorch.log_model(
            cpu_net,
            name=name,
            signature=infer_signature(example.numpy(), outputs.numpy()),
            input_example=example.numpy(),
            pip_requirements=pinned("torch", "torchvision", "numpy"),
            code_paths=[str(PACKAGE_DIR)],
            serialization_format="pickle",
        )


def to_onnx(cpu_net: nn.Module, example_batch: torch.Tensor) -> onnx.ModelProto:
    """Export `cpu_net` (a `_cpu_copy`) with a dynamic batch axis; input ``images``, output
    ``logits``."""
    example = example_batch[:1].detach().to("cpu", torch.float32)
    stream = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which takes ten times
        # as long per export; for these convolutional nets both give one graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            cpu_net,
            (example,),
            stream,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return onnx.load_model_from_string(stream.getvalue())


def log_onnx(net: nn.Module, example_batch: torch.Tensor, name: str = "model_onnx") -> ModelInfo:
    example = example_batch[:4].detach().to("cpu", torch.float32).numpy()
    cpu_net = _cpu_copy(net)
    with torch.no_grad():
        outputs = cpu_net(torch.from_numpy(example)).numpy()
    return mlflow.onnx.log_model(
        to_onnx(cpu_net, example_batch),
        name=name,
        signature=infer_signature(example, outputs),
        input_example=example,
        pip_requirements=pinned("onnx", "onnxruntime", "numpy"),
        # The pinned onnxruntime is the CPU build; a GPU host installs onnxruntime-gpu and
        # passes its providers when it loads the model.
        onnx_execution_providers=["CPUExecutionProvider"],
    )


@dataclass(frozen=True)
class ServedClasses:
    """What the served classifier needs besides the network: class names and preprocessing."""

    class_names: tuple[str, ...]
    preprocessing: ImagePreprocessing

    @classmethod
    def of(cls, datamodule: ClassificationDataModule) -> ServedClasses:
        info = datamodule.info
        mean, std = datamodule.normalization
        return cls(
            info.class_names,
            ImagePreprocessing(info.in_channels, info.image_size, tuple(mean), tuple(std)),
        )

    def to_json(self) -> str:
        return json.dumps({"class_names": self.class_names, **asdict(self.preprocessing)})

    @classmethod
    def from_json(cls, text: str) -> ServedClasses:
        values = json.loads(text)
        names = tuple(values.pop("class_names"))
        values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
        return cls(names, ImagePreprocessing(**values))


def log_served_classifier(
    net: nn.Module,
    net_spec: dict,
    served: ServedClasses,
    example_batch: torch.Tensor,
    name: str = "classifier",
) -> ModelInfo:
    """The model `dlharness-serve` serves: raw images in, class names out (no dlharness needed)."""
    # log_classifier saves only the weights, as float32 on the CPU: no copy of the network.
    return log_classifier(
        net,
        net_spec,
        Path(nets.__file__),
        served.class_names,
        served.preprocessing,
        served.preprocessing.raw_images(example_batch[:2]),
        name=name,
    )


def register_candidate(model_uri: str, name: str) -> str:
    """Register `model_uri` under `name` and point the alias ``candidate`` at the new version."""
    version_ = mlflow.register_model(model_uri, name)
    MlflowClient().set_registered_model_alias(name, CANDIDATE_ALIAS, version_.version)
    return str(version_.version)


def save_for_replay(
    net: nn.Module,
    net_spec: dict,
    served: ServedClasses,
    example_batch: torch.Tensor,
    folder: Path,
):
    """What `replay_final_model` needs, as plain weights and JSON (no pickled objects)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_cpu_copy(net).state_dict(), folder / "weights.pt")
    (folder / "net_spec.json").write_text(json.dumps(net_spec))
    (folder / "served.json").write_text(served.to_json())
    example = folder.parent / "example.npy"
    np.save(example, example_batch[:4].detach().to("cpu", torch.float32).numpy())
    return folder, example


@dataclass
class LoggedModels:
    model_uri: str
    onnx_model_uri: str | None
    classifier_uri: str
    registered_version: str | None


def log_final_model(
    net: nn.Module,
    net_spec: dict,
    served: ServedClasses,
    example_batch: torch.Tensor,
    onnx_too: bool,
    register: str | None,
    timings: dict[str, float] | None = None,
) -> LoggedModels:
    """The run's models, logged into the active run: pytorch, ONNX, the served classifier
    (which `register` registers), with the seconds each took in `timings`."""
    timings = {} if timings is None else timings
    started = time.perf_counter()
    model_info = log_network(net, example_batch)
    timings["model"] = time.perf_counter() - started
    started = time.perf_counter()
    onnx_info = log_onnx(net, example_batch) if onnx_too else None
    timings["onnx"] = time.perf_counter() - started
    started = time.perf_counter()
    classifier = log_served_classifier(net, net_spec, served, example_batch)
    timings["classifier"] = time.perf_counter() - started
    started = time.perf_counter()
    version_ = register_candidate(classifier.model_uri, register) if register else None
    timings["registry"] = time.perf_counter() - started
    return LoggedModels(
        model_info.model_uri,
        onnx_info.model_uri if onnx_info else None,
        classifier.model_uri,
        version_,
    )


# The spooled operation `spool_final_model` journals and `replay_final_model` replays.
FINAL_MODEL_OP = "final_model"


def spool_final_model(
    client: SpoolingClient, model_dir: Path, example: Path, onnx_too: bool, register: str | None
) -> None:
    """The end-of-run model logging, done once the server answers again (by this process
    before the run ends, else by `dlharness-sync`)."""
    client.spool_operation(
        FINAL_MODEL_OP,
        files={"model": model_dir, "example.npy": example},
        replayer=replay_final_model,
        onnx=onnx_too,
        register=register,
    )


def replay_final_model(tracking_uri: str, spool: Spool, entry: dict[str, Any]) -> None:
    """Log the models that a tracking outage kept from being logged, into their run."""
    from dlharness.models.nets import build_net

    folder = spool.file(entry, "model")
    net_spec = json.loads((folder / "net_spec.json").read_text())
    net = build_net(net_spec)
    net.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    served = ServedClasses.from_json((folder / "served.json").read_text())
    example = torch.from_numpy(np.load(spool.file(entry, "example.npy")))
    mlflow.set_tracking_uri(tracking_uri)
    # Reopening the run marks it RUNNING; the journal's last entry sets its real end.
    with mlflow.start_run(run_id=spool.run_id):
        log_final_model(net, net_spec, served, example, entry["onnx"], entry["register"])
