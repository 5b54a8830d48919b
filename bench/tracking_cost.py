"""What tracking costs: the same training four ways, timed (`python scripts/bench.py --help`).

(a) a plain PyTorch loop doing the module's work (forward, loss, backward, step, the same
    torchmetrics); (b) bare Lightning (no logger, checkpointing or progress bar);
(c) dlharness with all its tracking (epoch tracker with a checkpoint every epoch, plots,
    system metrics, final model and ONNX); (d) `mlflow.pytorch.autolog()` with its defaults on
    bare Lightning, for reference.

Each variant runs in a fresh process (no warm imports, patches or thread pools carried over),
the variants interleaved, each several times, each round starting with the next variant; the
table shows median, min and max. The ratios
compare the training phase (`fit`, including the per-epoch tracking and draining its uploads);
dlharness's end-of-run work (evaluation, model, ONNX) is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = {
    "a": "plain_pytorch",
    "b": "bare_lightning",
    "c": "dlharness",
    "d": "autolog_defaults",
    # dlharness with tracker.logged_models off: what a LoggedModel per checkpoint costs (c - e).
    "e": "dlharness_without_logged_models",
}
# Budgets from the performance issues: training-phase ratios (checked on the paired ratio, the
# median over rounds of each round's ratio) and dlharness's end-of-run cost in seconds.
BUDGETS = {
    "digits": {"ratio_c_over_b": 1.10, "ratio_b_over_a": 1.10, "end_of_run_s": 1.0},
    "heavy": {"ratio_c_over_b": 1.02, "ratio_b_over_a": 1.10, "end_of_run_s": 1.0},
    # The GPU fast path (issue 19): dlharness at >= 0.97x bare Lightning's images/s once
    # compiled (epoch time <= 1/0.97), and >= 3x the 11 000 images/s measured on an H200 on
    # 2026-11-26 before it.
    "gpu_fast": {"steady_ratio_c_over_b": 1 / 0.97, "steady_images_per_s_c": 33_000},
}
# Dense bf16 tensor-core peak, FLOP/s, from NVIDIA's data sheets (SXM parts): the denominator
# of model FLOP utilisation. A GPU not listed gets no MFU figure.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 80GB HBM3": 989e12, "A100-SXM4": 312e12}


@dataclass
class Workload:
    name: str
    epochs: int
    # None: the digits set; else synthetic 3×32×32 images in CIFAR-10's on-disk format.
    samples: int | None
    model: str
    width: int
    batch_size: int
    precision: str = "32"
    channels_last: bool = False
    # data.on_device: every split held as tensors on the training device.
    data_on_device: bool = False
    # trainer.compile; trainer.deterministic (off: cuDNN picks its fastest algorithms).
    compile: bool = False
    deterministic: bool = True


def workloads(device: str, epochs: int | None, samples: int | None) -> dict[str, Workload]:
    if device == "gpu":
        # resnet18 on 20k CIFAR-sized images in bf16-mixed and NHWC: read through the data
        # loader (per-sample transforms on the CPU), and held on the GPU.
        heavy = ("resnet18", 64, 256, "bf16-mixed", True)
        return {
            "gpu_heavy": Workload("gpu_heavy", epochs or 5, samples or 20_000, *heavy),
            "gpu_heavy_data_on_device": Workload(
                "gpu_heavy_data_on_device", epochs or 5, samples or 20_000, *heavy, True
            ),
            # The fast path: the same network and data held on the device, compiled, cuDNN
            # free to pick, batches of 1024 (at 256, 2026-11-26's 11 000 images/s were bound
            # by per-batch host work, b/a 1.4-1.5). Four epochs: the first compiles, the other
            # three give the steady rate.
            "gpu_fast": Workload(
                "gpu_fast",
                epochs or 4,
                samples or 50_000,
                *heavy[:2],
                1024,
                "bf16-mixed",
                channels_last=True,
                data_on_device=True,
                compile=True,
                deterministic=False,
            ),
        }
    return {
        "digits": Workload("digits", epochs or 20, None, "cnn", 32, 64),
        # ≈ 4 s per epoch on 2 cores: 1020 training images through the 3-stage CNN.
        "heavy": Workload("heavy", epochs or 5, samples or 1200, "cnn", 32, 128),
    }


def write_synthetic_cifar(root: Path, samples: int, seed: int = 0) -> None:
    """`samples` training images (5 batch files) and samples/5 test images, class-coloured."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = max(1, samples // 5)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, size=per_batch)
        images = rng.integers(0, 128, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        images[np.arange(per_batch), labels % 3] += 100  # a learnable hint per class
        batch = {"data": images.reshape(per_batch, -1), "labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def build_config(work: Workload, data_dir: Path, store: Path, accelerator: str):
    from dlharness.training.config import load_config

    values: dict[str, Any] = {
        "trainer.max_epochs": work.epochs,
        "trainer.accelerator": accelerator,
        "trainer.precision": work.precision,
        "trainer.channels_last": work.channels_last,
        "data.on_device": work.data_on_device,
        "trainer.compile": work.compile,
        "trainer.deterministic": work.deterministic,
        "model.name": work.model,
        "model.width": work.width,
        "data.batch_size": work.batch_size,
        "tracking.tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
        "tracking.experiment": f"bench-{work.name}",
    }
    if work.samples is not None:
        # Without augmentation, as measured before cifar10 had it by default: the workloads
        # stay comparable across sessions.
        values.update(
            {"data.dataset": "cifar10", "data.data_dir": str(data_dir), "data.augment": "none"}
        )
    return load_config(None, values)


# The four variants, each run in its own process by `worker`.


def run_plain(cfg, work: Workload, device: str) -> dict[str, float]:
    import math

    import lightning as L
    import torch
    import torch.nn.functional as F

    from dlharness.models.classifier import OPTIMIZERS, classification_metrics
    from dlharness.models.nets import build_net
    from dlharness.training.components import build_datamodule, net_spec

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # As (b) and (c) run: Trainer(deterministic="warn" or False, benchmark=not deterministic).
    torch.use_deterministic_algorithms(work.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not work.deterministic
    dm = build_datamodule(cfg.data, cfg.seed)
    dm.prepare_data()
    dm.setup()
    target = torch.device("cuda" if device == "gpu" else "cpu")
    dm.device_without_trainer = target
    net = build_net(net_spec(cfg.model, dm.info)).to(target)
    memory_format = torch.channels_last if work.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    model = torch.compile(net) if work.compile else net
    opt = OPTIMIZERS[cfg.optim.optimizer](
        net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    epochs = cfg.trainer.max_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    )
    train_metrics = classification_metrics(dm.info.num_classes).to(target)
    val_metrics = classification_metrics(dm.info.num_classes).to(target)
    autocast = torch.autocast(
        target.type, dtype=torch.bfloat16, enabled=work.precision == "bf16-mixed"
    )
    images = 0
    epoch_s, cpu_s = [], []
    start = time.perf_counter()
    # Inside the timed part, as Lightning makes its loaders inside `fit`.
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    for _ in range(epochs):
        epoch_start, cpu_start = time.perf_counter(), time.process_time()
        net.train()
        for x, y in train_loader:
            x = x.to(target, non_blocking=True, memory_format=memory_format)
            y = y.to(target, non_blocking=True)
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_metrics.update(logits.detach().float().softmax(-1), y)
            images += len(y)
        train_metrics.compute()
        train_metrics.reset()
        schedule.step()
        net.eval()
        with torch.no_grad(), autocast:
            for x, y in val_loader:
                x, y = x.to(target, memory_format=memory_format), y.to(target)
                val_metrics.update(model(x).float().softmax(-1), y)
        val_metrics.compute()
        val_metrics.reset()
        if target.type == "cuda":
            torch.cuda.synchronize()
        epoch_s.append(time.perf_counter() - epoch_start)
        cpu_s.append(time.process_time() - cpu_start)
    seconds = time.perf_counter() - start
    measured = steady(cfg, work, epoch_s, cpu_s, dm)
    return {"fit_s": seconds, "images_per_s": images / seconds, **measured}


def forward_flops_per_image(cfg, info) -> float:
    """FLOPs of one image of the data set `info` describes through the network's forward
    (torch's counter: 2 per multiply-add of convolutions and matrix products), on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dlharness.models.nets import build_net
    from dlharness.training.components import net_spec

    net = build_net(net_spec(cfg.model, info)).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(torch.zeros(1, info.in_channels, info.image_size, info.image_size))
    return float(counter.get_total_flops())


def steady(
    cfg, work: Workload, epoch_s: Sequence[float], cpu_s: Sequence[float], dm
) -> dict[str, float]:
    """The rate once warm: the median epoch (training and validation) after the first, which
    also compiles; model FLOP utilisation where the GPU's bf16 peak is known (a training
    image costs 3 forwards: forward and a backward of twice its work; validation 1); and the
    cores the process kept busy over its epochs (CPU seconds of all its threads, spinning
    OpenMP threads included, per second): 2 on a 2-core machine leaves tracking no idle core."""
    import torch

    later = list(epoch_s[1:]) or list(epoch_s)
    epoch = statistics.median(later)
    sizes = dm.split_sizes()
    measured = {
        "first_epoch_s": epoch_s[0],
        "steady_epoch_s": epoch,
        "steady_images_per_s": sizes["train"] / epoch,
        "cores_busy": sum(cpu_s) / sum(epoch_s),
    }
    if cfg.trainer.accelerator == "gpu" and work.precision == "bf16-mixed":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak is not None:
            flops = forward_flops_per_image(cfg, dm.info) * (3 * sizes["train"] + sizes["val"])
            measured["steady_mfu"] = flops / epoch / peak
    return measured


def device_clock(device: str) -> float:
    """`time.perf_counter()` once the GPU (on a GPU run) has done all it was given."""
    if device == "gpu":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def epoch_clock(device: str):
    """A Lightning callback that times each training epoch from its start to the next one's
    (the last: to the end of training), waiting for the GPU at each. So an epoch holds its
    validation and every callback's epoch-end work, also that of the `Checkpoint` callbacks
    (MlflowTracking is one), which Lightning calls after all others."""
    import lightning as L

    class EpochClock(L.Callback):
        def __init__(self) -> None:
            self.epoch_s: list[float] = []
            self.cpu_s: list[float] = []
            self.started: float | None = None
            self.cpu_started = 0.0

        def _lap(self) -> None:
            moment, cpu = device_clock(device), time.process_time()
            if self.started is not None:
                self.epoch_s.append(moment - self.started)
                self.cpu_s.append(cpu - self.cpu_started)
            self.started, self.cpu_started = moment, cpu

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._lap()

        def on_train_end(self, trainer, pl_module) -> None:
            self._lap()
            self.started = None

    return EpochClock()


def _bare_trainer(cfg, accelerator: str, **extra: Any):
    import lightning as L

    return L.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        accelerator=accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        # As dlharness's own trainer: see training/train.py's build_trainer.
        deterministic="warn" if cfg.trainer.deterministic else False,
        benchmark=not cfg.trainer.deterministic,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def run_lightning(cfg, work: Workload, device: str, autolog: bool) -> dict[str, float]:
    import warnings

    import lightning as L
    import mlflow

    from dlharness.training.components import build_datamodule, build_module

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg.data, cfg.seed)
    dm.prepare_data()
    module = build_module(cfg, dm)
    clock = epoch_clock(device)
    trainer = _bare_trainer(cfg, "gpu" if device == "gpu" else "cpu", callbacks=[clock])
    if not autolog:
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
    else:
        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        mlflow.pytorch.autolog()  # its defaults: model logging, requirement inference, ...
        with mlflow.start_run():
            start = time.perf_counter()
            trainer.fit(module, datamodule=dm)
            seconds = time.perf_counter() - start
    images = dm.split_sizes()["train"] * cfg.trainer.max_epochs
    return {
        "fit_s": seconds,
        "images_per_s": images / seconds,
        **steady(cfg, work, clock.epoch_s, clock.cpu_s, dm),
    }


def run_dlharness(cfg, work: Workload, device: str) -> dict[str, float]:
    from dlharness.training.collector import freeze_long_lived_objects
    from dlharness.training.train import train

    freeze_long_lived_objects()  # as the dlharness-train command does
    clock = epoch_clock(device)
    result = train(cfg, fast_package_index=True, callbacks=[clock])
    t = result.timings
    epochs = cfg.trainer.max_epochs
    workers = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("worker/")}
    per_epoch_ms = {
        # Epochs without a checkpoint only: a checkpoint epoch's values go in its upload's
        # `log_batch` (artifact_upload below).
        "metric_logging": workers.get("epoch metrics", 0.0),
        # The tracking thread's part (logging the files) and the helper process's (drawing and
        # encoding them, its start-up included).
        "plots": workers.get("epoch plots", 0.0) + workers.get("confusion matrix image", 0.0),
        "plots_helper_process": workers.get("picture helper process", 0.0),
        # The copy on the training thread and the write on the worker.
        "checkpoint_save": t["checkpoint_save"] + workers.get("checkpoint write", 0.0),
        "artifact_upload": workers.get("checkpoint upload", 0.0),
        # The training thread inside MlflowTracking's hooks: the stall tracking causes
        # besides sharing the CPU (far steadier than wall time).
        "training_thread_stall": t["tracking_hooks"],
    }
    from dlharness.training.components import build_datamodule

    dm = build_datamodule(cfg.data, cfg.seed)
    images = dm.split_sizes()["train"] * epochs
    return {
        "fit_s": t["fit"],
        "images_per_s": images / t["fit"],
        **steady(cfg, work, clock.epoch_s, clock.cpu_s, dm),
        **{f"per_epoch_ms/{k}": 1000 * v / epochs for k, v in per_epoch_ms.items()},
        "once_s/run_context": sum(
            v
            for k, v in workers.items()
            if k
            in (
                "environment tags",
                "source and requirements",
                "hyperparameters",
                "model summary",
                "dataset records",
                "training sample grid",
            )
        ),
        "end_of_run_s/package_index": t["package_index"],
        "end_of_run_s/evaluation": t["evaluation"],
        "end_of_run_s/model": t["model"],
        "end_of_run_s/onnx": t["onnx"],
        "end_of_run_s/classifier": t["classifier"],
        "end_of_run_s": sum(
            t[phase]
            for phase in ("package_index", "evaluation", "model", "onnx", "classifier", "registry")
        ),
    }


def worker(variant: str, work: Workload, device: str, scratch: Path) -> dict[str, float]:
    """One timed run of `variant` in this process."""
    if work.samples is not None and not (scratch / "data" / "cifar-10-batches-py").exists():
        write_synthetic_cifar(scratch / "data", work.samples)
    store = scratch / f"store-{variant}-{time.monotonic_ns()}"
    store.mkdir()
    cfg = build_config(work, scratch / "data", store, "gpu" if device == "gpu" else "cpu")
    if variant == "a":
        measured = run_plain(cfg, work, device)
    elif variant in ("b", "d"):
        measured = run_lightning(cfg, work, device, autolog=variant == "d")
    else:
        if variant == "e":
            cfg.tracker.logged_models = False
        measured = run_dlharness(cfg, work, device)
    # ru_maxrss is in KiB on Linux.
    measured["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return measured


# Orchestration


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def median_interval(values: Sequence[float], resamples: int = 10_000) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of `values` (percentile method, seeded: the
    same rounds always give the same interval). Narrower than min–max and, unlike it, no
    wider for more rounds: what tells a ratio of 1.05 from 1.10."""
    rng = np.random.default_rng(0)
    draws = rng.choice(np.asarray(values, dtype=float), size=(resamples, len(values)))
    low, high = np.percentile(np.median(draws, axis=1), [2.5, 97.5])
    return float(low), float(high)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    from dlharness.tracking.provenance.environment import collect_environment

    env = collect_environment("gpu" if torch.cuda.is_available() else "cpu", 1, "32")
    return {
        "cpu": env.host_cpu,
        "cores": env.host_cores,
        "gpu": ", ".join(g.name for g in env.gpus) or "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "mlflow": version("mlflow"),
    }


def measure(
    work: Workload, variants: str, repeats: int, device: str, in_process: bool
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="dlharness-bench-") as scratch:
        for round_ in range(repeats):
            # Interleaved, so drift hits every variant alike, and each round starts with the
            # next variant, so that no variant always runs in the same place (after (d), the
            # longest, or first after a pause).
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if in_process:
                    measured = worker(variant, work, device, Path(scratch))
                else:
                    out = Path(scratch) / "out.json"
                    argv = [
                        *(sys.executable, __file__, "--worker", variant),
                        *("--device", device, "--workload", json.dumps(asdict(work))),
                        *("--scratch", scratch, "--worker-out", str(out)),
                    ]
                    done = subprocess.run(
                        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                    )
                    if done.returncode:
                        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-3000:]}")
                    measured = json.loads(out.read_text())
                runs[variant].append(measured)
                # One line per run: an interrupted benchmark still shows what it measured.
                print(
                    f"{work.name} ({variant}): fit {measured['fit_s']:.2f} s, "
                    f"{measured['images_per_s']:.0f} images/s",
                    file=sys.stderr,
                    flush=True,
                )
    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "workload": asdict(work),
        "repeats": repeats,
        "device": device,
    }
    for variant, measured in runs.items():
        name = f"{variant}_{VARIANTS[variant]}"
        keys = measured[0].keys()
        result[name] = {key: _spread([m[key] for m in measured]) for key in keys}
    # Fit (the whole training phase) and the steady epoch (after the first, which compiles).
    for time_key, prefix in (("fit_s", "ratio"), ("steady_epoch_s", "steady_ratio")):
        median = {v: result[f"{v}_{VARIANTS[v]}"][time_key]["median"] for v in variants}
        for top, bottom in (("c", "b"), ("b", "a"), ("d", "b"), ("c", "e")):
            if top not in median or bottom not in median:
                continue
            result[f"{prefix}_{top}_over_{bottom}"] = median[top] / median[bottom]
            # Paired: the ratio within each round, where a slow moment of the machine hits
            # both variants, then its median and spread over the rounds.
            per_round = [
                t[time_key] / b[time_key] for t, b in zip(runs[top], runs[bottom], strict=True)
            ]
            result[f"paired_{prefix}_{top}_over_{bottom}"] = {
                **_spread(per_round),
                "ci95": median_interval(per_round),
                "rounds": [round(r, 4) for r in per_round],
            }
    fit = {v: result[f"{v}_{VARIANTS[v]}"]["fit_s"]["median"] for v in variants}
    budget = BUDGETS.get(work.name, {})
    checks = {}
    for ratio in ("ratio_c_over_b", "ratio_b_over_a", "steady_ratio_c_over_b"):
        if f"paired_{ratio}" in result and ratio in budget:
            checks[ratio] = result[f"paired_{ratio}"]["median"] <= budget[ratio]
    if "c" in fit and "steady_images_per_s_c" in budget:
        rate = result["c_dlharness"]["steady_images_per_s"]["median"]
        checks["steady_images_per_s_c"] = rate >= budget["steady_images_per_s_c"]
    if "c" in fit and "end_of_run_s" in budget:
        end = result["c_dlharness"]["end_of_run_s"]["median"]
        checks["end_of_run_s"] = end <= budget["end_of_run_s"]
    result["budget"] = budget
    result["within_budget"] = checks
    return result


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for name, result in results["workloads"].items():
        epochs, repeats = result["workload"]["epochs"], result["repeats"]
        title = f"{name}: {epochs} epochs, {repeats} runs each (median [min–max])"
        table = Table(title=escape(title))  # brackets are rich markup otherwise
        columns = (
            *("variant", "fit s", "first epoch s", "steady images/s", "MFU", "cores busy"),
            "peak RSS MB",
        )
        for column in columns:
            table.add_column(column, justify="right")
        for variant, label in VARIANTS.items():
            row = result.get(f"{variant}_{label}")
            if row is None:
                continue
            fit, rate = row["fit_s"], row["steady_images_per_s"]
            mfu = f"{row['steady_mfu']['median']:.1%}" if "steady_mfu" in row else "-"
            table.add_row(
                f"({variant}) {label}",
                f"{fit['median']:.2f} [{fit['min']:.2f}–{fit['max']:.2f}]",
                f"{row['first_epoch_s']['median']:.2f}",
                f"{rate['median']:.0f} [{rate['min']:.0f}–{rate['max']:.0f}]",
                mfu,
                f"{row['cores_busy']['median']:.2f}",
                f"{row['peak_rss_mb']['median']:.0f}",
            )
        console.print(table)
        for prefix, what in (("ratio_", "fit"), ("steady_ratio_", "steady epoch")):
            ratios = "  ".join(
                f"{k.removeprefix(prefix).replace('_over_', '/')} = {v:.3f}"
                for k, v in result.items()
                if k.startswith(prefix)
            )
            console.print(f"  {what}, ratios of medians: {ratios}")
            paired = "  ".join(
                f"{k.removeprefix('paired_' + prefix).replace('_over_', '/')} = "
                f"{v['median']:.3f} [{v['min']:.3f}–{v['max']:.3f}], "
                f"95 % interval {v['ci95'][0]:.3f}–{v['ci95'][1]:.3f}"
                for k, v in result.items()
                if k.startswith("paired_" + prefix)
            )
            console.print(escape(f"  {what}, paired ratios (median [min–max]): {paired}"))
        if "c_dlharness" in result:
            c = result["c_dlharness"]
            parts = "  ".join(
                f"{k.split('/')[1]} {v['median']:.1f}"
                for k, v in c.items()
                if k.startswith("per_epoch_ms/")
            )
            console.print(f"  tracking per epoch (ms): {parts}")
            end = {k: v["median"] for k, v in c.items() if k.startswith("end_of_run_s")}
            parts = ", ".join(
                f"{key.split('/')[1]} {value:.2f}"
                for key, value in end.items()
                if key.startswith("end_of_run_s/")
            )
            console.print(f"  end of run: {end['end_of_run_s']:.2f} s ({parts})")
        for check, ok in result["within_budget"].items():
            limit = result["budget"][check]
            sure = ""
            if f"paired_{check}" in result:
                low, high = result[f"paired_{check}"]["ci95"]
                sure = (
                    ", so is its 95 % interval"
                    if (high <= limit if ok else low > limit)
                    else ", but its 95 % interval straddles the budget"
                )
            console.print(f"  {check}: {'within' if ok else 'OVER'} budget ({limit}){sure}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads",
        help="comma-separated: digits, heavy; with --device gpu: gpu_heavy, "
        "gpu_heavy_data_on_device, gpu_fast (default: all of the device's)",
    )
    parser.add_argument(
        "--variants",
        default="abcd",
        help="subset of abcde (e: c with tracker.logged_models off) (default: %(default)s)",
    )
    # Seven rounds: fewer cannot tell a ratio of 1.10 from 1.20 on a noisy 2-core machine.
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="rounds, each runs every variant (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs", type=int, help="override every workload's epochs (default: per workload)"
    )
    parser.add_argument(
        "--samples", type=int, help="override the heavy workload's images (default: per workload)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="cpu", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="no fresh process per run (smoke tests only)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results.json"),
        help="results file; the other device's section in it is kept (default: %(default)s)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        work = Workload(**json.loads(args.workload))
        args.worker_out.write_text(json.dumps(worker(args.worker, work, args.device, args.scratch)))
        return 0
    if args.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("bench: error: --device gpu needs CUDA", file=sys.stderr)
            return 2
    available = workloads(args.device, args.epochs, args.samples)
    chosen = [w.strip() for w in (args.workloads or ",".join(available)).split(",") if w.strip()]
    unknown = [w for w in chosen if w not in available]
    if unknown or not chosen or not set(args.variants) <= set(VARIANTS):
        print(f"bench: error: workloads: {', '.join(available)}; variants: abcd", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    section = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "workloads": {
            name: measure(
                available[name], args.variants, args.repeats, args.device, args.in_process
            )
            for name in chosen
        },
    }
    results = merge_results(read_results(args.out), args.device, section)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_report(section)
    print(f"results written to {args.out}")
    return 0


def read_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def merge_results(previous: dict[str, Any], device: str, section: dict[str, Any]) -> dict[str, Any]:
    """One section per device, updated by workload (a GPU run keeps the CPU numbers, a run of
    one workload the others'), then flat keys such as ``digits.ratio_c_over_b`` and
    ``digits.paired_ratio_c_over_b`` (the median over rounds)."""
    results = {d: previous[d] for d in ("cpu", "gpu") if isinstance(previous.get(d), dict)}
    kept = results.get(device, {}).get("workloads", {})
    results[device] = {**section, "workloads": {**kept, **section["workloads"]}}
    results = {d: results[d] for d in ("cpu", "gpu") if d in results}
    for part in list(results.values()):
        for name, result in part["workloads"].items():
            for key, value in result.items():
                if key.startswith(("ratio_", "steady_ratio_")):
                    results[f"{name}.{key}"] = value
                if key.startswith(("paired_ratio_", "paired_steady_ratio_")):
                    results[f"{name}.{key}"] = value["median"]
            if "c_dlharness" in result:
                results[f"{name}.end_of_run_s"] = result["c_dlharness"]["end_of_run_s"]["median"]
    return results


if __name__ == "__main__":
    sys.exit(main())
