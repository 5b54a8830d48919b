"""Where one epoch's time goes: GPU kernels, the gaps between them, host work (`--help`).

Profiles the second epoch (the first compiles and warms up) of one benchmark workload, run
by bare Lightning (b) or dlharness (c), with torch's profiler, and splits its wall time into:
the GPU busy with kernels and copies (the union of their intervals), the GPU idle (launch
gaps: the host did not give it work fast enough), the training thread inside torch's ops
(dispatch, the CUDA launch calls) and outside any op (Python: Lightning's loop, hooks,
metrics bookkeeping, tracking). Written to a JSON file and printed; on a machine without CUDA
the GPU shares are absent (the script still runs, so a test keeps it working).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


def _tracking_cost() -> ModuleType:
    """bench/tracking_cost.py, this script's neighbour (bench/ is not a package), imported
    once: its dataclasses must be the same wherever they are used."""
    if "tracking_cost" not in sys.modules:
        path = Path(__file__).with_name("tracking_cost.py")
        spec = importlib.util.spec_from_file_location("tracking_cost", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["tracking_cost"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["tracking_cost"]


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, in their unit."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def epoch_profiler(epoch: int, device: str):
    """A Lightning callback that profiles training epoch `epoch`, its validation and every
    callback's work at its end."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "gpu":
        activities.append(ProfilerActivity.CUDA)
    device_clock = _tracking_cost().device_clock

    class EpochProfiler(L.Callback):
        # Until the next epoch starts (or training ends), not `on_train_epoch_end`: Lightning
        # calls the Checkpoint callbacks' (MlflowTracking's) after every other callback's.
        def __init__(self) -> None:
            self.profile: Any = None
            self.wall_s = 0.0
            self._started: float | None = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._stop()
            if trainer.current_epoch == epoch:
                self.profile = profile(activities=activities)
                self.profile.__enter__()
                self._started = device_clock(device)

        def on_train_end(self, trainer, pl_module) -> None:
            self._stop()

        def _stop(self) -> None:
            if self._started is None:
                return
            self.wall_s = device_clock(device) - self._started
            self.profile.__exit__(None, None, None)
            self._started = None

    return EpochProfiler()


def split_epoch(profiled: Any, wall_s: float) -> dict[str, Any]:
    """The epoch's wall time split as the module's docstring says (seconds and shares)."""
    from torch.autograd import DeviceType

    events = list(profiled.events())
    device_events = [e for e in events if e.device_type == DeviceType.CUDA]
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    # The training thread records the most top-level ops (the tracking thread runs none).
    top_level = [e for e in host_events if e.cpu_parent is None]
    training_thread = Counter(e.thread for e in top_level).most_common(1)[0][0]
    ops = [e for e in top_level if e.thread == training_thread]
    in_ops_s = union_seconds([(e.time_range.start, e.time_range.end) for e in ops]) / 1e6
    launch_s = sum(e.self_cpu_time_total for e in host_events if e.name.startswith("cuda")) / 1e6
    names = Counter(e.name for e in events)
    split: dict[str, Any] = {
        "wall_s": wall_s,
        # The host waiting for the device: values read back (`.item()`, `if tensor:`; on a
        # CPU tensor these cost nothing) and explicit synchronisations.
        "value_reads": names["aten::_local_scalar_dense"],
        "host_syncs": sum(n for name, n in names.items() if name.endswith("Synchronize")),
        "host_in_torch_ops_s": in_ops_s,
        "host_outside_ops_s": max(0.0, wall_s - in_ops_s),
        "host_cuda_api_s": launch_s,
        "top_host_ops_self_ms": {
            row.key: round(row.self_cpu_time_total / 1e3, 2)
            for row in sorted(
                profiled.key_averages(), key=lambda r: r.self_cpu_time_total, reverse=True
            )[:12]
        },
    }
    if device_events:
        busy_s = union_seconds([(e.time_range.start, e.time_range.end) for e in device_events])
        busy_s /= 1e6
        split.update(
            {
                "gpu_busy_s": busy_s,
                "gpu_idle_s": max(0.0, wall_s - busy_s),
                "gpu_busy_share": busy_s / wall_s,
                "gpu_kernels": len(device_events),
                "gpu_mean_kernel_us": 1e6 * busy_s / len(device_events),
            }
        )
    split["host_outside_ops_share"] = split["host_outside_ops_s"] / wall_s
    return split


def verdict(split: dict[str, Any]) -> str:
    """One line naming where the time goes."""
    if "gpu_busy_share" not in split:
        return f"CPU run: {split['host_outside_ops_share']:.0%} of the epoch outside torch's ops"
    busy = split["gpu_busy_share"]
    if busy >= 0.8:
        return f"kernel-bound: the GPU is busy {busy:.0%} of the epoch"
    return (
        f"launch/host-bound: the GPU is idle {1 - busy:.0%} of the epoch; the training thread "
        f"spends {split['host_outside_ops_share']:.0%} of it outside torch's ops (Python)"
    )


def profile_workload(
    variant: str, work: Any, device: str, scratch: Path, epoch: int = 1
) -> dict[str, Any]:
    bench = _tracking_cost()
    if work.samples is not None:
        bench.write_synthetic_cifar(scratch / "data", work.samples)
    store = scratch / "store"
    store.mkdir()
    cfg = bench.build_config(work, scratch / "data", store, "gpu" if device == "gpu" else "cpu")
    profiler = epoch_profiler(epoch, device)
    if variant == "c":
        from dlharness.training.train import train

        train(cfg, callbacks=[profiler])
    else:
        import lightning as L

        from dlharness.training.components import build_datamodule, build_module

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg.data, cfg.seed)
        dm.prepare_data()
        trainer = bench._bare_trainer(cfg, cfg.trainer.accelerator, callbacks=[profiler])
        trainer.fit(build_module(cfg, dm), datamodule=dm)
    if profiler.profile is None:
        raise RuntimeError(f"the workload has no epoch {epoch} to profile")
    split = split_epoch(profiler.profile, profiler.wall_s)
    return {"variant": variant, "workload": work.name, "epoch": epoch, **split}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_profile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        default="gpu_heavy_data_on_device",
        help="a workload of scripts/bench.py for the device (default: %(default)s)",
    )
    parser.add_argument("--variant", choices=("b", "c"), default="c", help="(default: %(default)s)")
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="gpu", help="(default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, help="override the workload's epochs (>= 2)")
    parser.add_argument("--samples", type=int, help="override the workload's images")
    parser.add_argument("--out", type=Path, help="also write the split as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    available = _tracking_cost().workloads(args.device, args.epochs, args.samples)
    if args.workload not in available:
        print(f"gpu_profile: error: workloads: {', '.join(available)}", file=sys.stderr)
        return 2
    work = available[args.workload]
    with tempfile.TemporaryDirectory(prefix="dlharness-profile-") as scratch:
        result = profile_workload(args.variant, work, args.device, Path(scratch))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    shares = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print(json.dumps(shares, indent=2))
    print(f"{args.workload} ({args.variant}), epoch {result['epoch']}: {verdict(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
