"""Load on one MLflow tracking server: K simulated trainings at once, for K = 1, 2, 4, ….

Each simulated training does what a dlharness run sends a server: it opens a run, logs its
params, then once per epoch (every `--epoch-s` seconds) logs a batch of epoch metrics, uploads
a checkpoint-sized artifact and logs a small image, and ends its run after `--epochs` epochs
(then opens the next). Every request is timed. A level lasts `--seconds`; the whole script
stops by itself after `--max-seconds`, and talks to loopback only.

Without `--tracking-uri` it starts its own `mlflow server` (dlharness-server's command) on
127.0.0.1 with `--backend-store-uri` (default: a fresh SQLite file) and `--workers`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from dlharness.store.server import is_loopback, running_server
from dlharness.tracking.provenance.environment import collect_environment

# A load test counts what fails: MLflow's client would otherwise retry a refused or timed-out
# request up to 7 times with backoff and hide it. It reads these at each request.
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # Not one "View run at" line per ended run.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

EPOCH_METRICS = (
    "train/loss",
    "train/acc",
    "train/lr",
    "val/loss",
    "val/acc",
    "val/f1",
    "val/auroc",
)
# About what a dlharness run logs as params (its flattened config and the module's hparams).
PARAM_COUNT = 60
DEFAULT_LEVELS = "1,2,4,8,16,32"


@dataclass
class Timings:
    """Every request's latency (s) by kind, failures and bytes sent, shared by the threads."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    artifact_bytes: int = 0
    epochs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def request(self, kind: str, size: int = 0) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except Exception:
            with self.lock:
                self.errors[kind] = self.errors.get(kind, 0) + 1
            raise
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latencies.setdefault(kind, []).append(elapsed)
            self.artifact_bytes += size


@contextmanager
def client_settings() -> Iterator[None]:
    """CLIENT_SETTINGS for the duration of the block, where the caller has not set them."""
    added = {name: value for name, value in CLIENT_SETTINGS.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def simulated_training(
    client: MlflowClient,
    experiment_id: str,
    timings: Timings,
    deadline: float,
    epochs: int,
    epoch_s: float,
    checkpoint: Path,
    image: Image.Image,
    offset_s: float,
) -> None:
    """Runs of `epochs` epochs, one after another, until `deadline`; failures are counted."""
    time.sleep(offset_s)  # spread the trainings over an epoch, as real ones drift apart
    size = checkpoint.stat().st_size
    while time.monotonic() < deadline:
        try:
            with timings.request("create_run"):
                run_id = client.create_run(experiment_id).info.run_id
            params = [Param(f"param.{i:02d}", str(i)) for i in range(PARAM_COUNT)]
            with timings.request("log_params"):
                client.log_batch(run_id, params=params)
        except Exception:
            time.sleep(epoch_s)
            continue
        start = time.monotonic()
        for epoch in range(epochs):
            if time.monotonic() >= deadline:
                break
            now_ms = int(time.time() * 1000)
            metrics = [Metric(key, 1.0 / (epoch + 1), now_ms, epoch) for key in EPOCH_METRICS]
            try:
                with timings.request("log_metrics"):
                    client.log_batch(run_id, metrics=metrics)
                with timings.request("log_checkpoint", size):
                    client.log_artifact(run_id, str(checkpoint), f"checkpoints/epoch_{epoch}")
                with timings.request("log_image"):
                    client.log_image(run_id, image, key="val_confusion_matrix", step=epoch)
                with timings.lock:
                    timings.epochs += 1  # an epoch counts once all its writes succeeded
            except Exception:
                pass
            time.sleep(max(0.0, start + (epoch + 1) * epoch_s - time.monotonic()))
        try:
            with timings.request("end_run"):
                client.set_terminated(run_id)
        except Exception:
            pass


def run_level(
    uri: str,
    experiment_id: str,
    k: int,
    args: argparse.Namespace,
    checkpoint: Path,
    image: Image.Image,
    server_pid: int | None,
) -> dict:
    timings = Timings()
    client = MlflowClient(uri)
    server = psutil.Process(server_pid) if server_pid else None
    server_cpu_before = _tree_cpu_s(server)
    own_cpu_before = time.process_time()
    start = time.monotonic()
    deadline = start + args.seconds
    threads = [
        threading.Thread(
            target=simulated_training,
            args=(
                client,
                experiment_id,
                timings,
                deadline,
                args.epochs,
                args.epoch_s,
                checkpoint,
                image,
                args.epoch_s * i / k,
            ),
            daemon=True,
        )
        for i in range(k)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A request may take up to the client's timeout beyond the deadline.
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 35)
    wall = time.monotonic() - start
    every = [value for values in timings.latencies.values() for value in values]
    writes = len(every)
    errors = sum(timings.errors.values())
    result = {
        "trainings": k,
        "seconds": round(wall, 2),
        "requests": writes + errors,
        "errors": errors,
        "writes_per_s": round(writes / wall, 1),
        "artifact_mb_per_s": round(timings.artifact_bytes / wall / 1e6, 2),
        "epochs_per_s": round(timings.epochs / wall, 2),
        "epochs_per_s_asked": round(k / args.epoch_s, 2),
        "latency_ms": {
            "p50": round(percentile(every, 50) * 1000, 1),
            "p99": round(percentile(every, 99) * 1000, 1),
        },
        "latency_ms_by_request": {
            kind: {
                "p50": round(percentile(values, 50) * 1000, 1),
                "p99": round(percentile(values, 99) * 1000, 1),
                "count": len(values),
            }
            for kind, values in sorted(timings.latencies.items())
        },
        # Both share this machine's cores: what the load generator itself took, and the server.
        "client_cpu_percent": round(100 * (time.process_time() - own_cpu_before) / wall, 1),
    }
    if server is not None:
        result["server_cpu_percent"] = round(
            100 * (_tree_cpu_s(server) - server_cpu_before) / wall, 1
        )
    return result


def _tree_cpu_s(process: psutil.Process | None) -> float:
    """CPU seconds of a process and its children (uvicorn's workers) so far."""
    if process is None:
        return 0.0
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def latency_doubles_at(levels: list[dict], quantile: str) -> int | None:
    """The first K whose latency is at least twice that of the first level, if any."""
    base = levels[0]["latency_ms"][quantile]
    for level in levels[1:]:
        if level["latency_ms"][quantile] >= 2 * base:
            return level["trainings"]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="load_server", description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="a running server on loopback (e.g. `make server`)")
    parser.add_argument(
        "--backend-store-uri",
        help="without --tracking-uri: the store of the server this script starts "
        "(default: a fresh SQLite file)",
    )
    parser.add_argument("--workers", type=int, default=1, help="that server's workers (default: 1)")
    parser.add_argument("--levels", default=DEFAULT_LEVELS, help="K values (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per level (default: 20)")
    parser.add_argument("--epochs", type=int, default=5, help="per simulated run (default: 5)")
    parser.add_argument("--epoch-s", type=float, default=1.0, help="seconds per epoch (default: 1)")
    parser.add_argument(
        "--checkpoint-mb", type=float, default=1.0, help="checkpoint size, MB (default: 1)"
    )
    parser.add_argument("--max-seconds", type=float, default=900.0, help="hard stop (default: 900)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--server-log", type=Path, help="keep the started server's log here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        levels = [int(k) for k in args.levels.split(",")]
    except ValueError:
        parser.error(f"--levels: comma-separated whole numbers, got {args.levels!r}")
    if not levels or min(levels) < 1:
        parser.error("--levels: at least one K, each at least 1")
    if args.tracking_uri and not is_loopback(urlparse(args.tracking_uri).hostname or ""):
        parser.error("--tracking-uri: loopback only (127.0.0.1 or localhost)")
    if (len(levels) * (args.seconds + 35)) > args.max_seconds:
        parser.error(f"{len(levels)} levels of {args.seconds:g} s may pass --max-seconds")

    with tempfile.TemporaryDirectory(prefix="load-server-") as scratch:
        folder = Path(scratch)
        checkpoint = folder / "checkpoint.pth"
        checkpoint.write_bytes(os.urandom(int(args.checkpoint_mb * 1e6)))
        # A 9×9 confusion-matrix-like picture, as the callback logs each epoch.
        pixels = np.random.default_rng(0).integers(0, 255, (180, 180, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        with client_settings(), _server(args, folder) as (uri, server_pid, backend):
            results = []
            for k in levels:
                client = MlflowClient(uri)
                experiment_id = client.create_experiment(f"load-{k}-{time.time_ns()}")
                level = run_level(uri, experiment_id, k, args, checkpoint, image, server_pid)
                results.append(level)
                _print_level(level)
    report = {
        "date": date.today().isoformat(),
        "machine": _machine(),
        "backend": backend,
        "workers": args.workers if args.tracking_uri is None else None,
        "epoch_s": args.epoch_s,
        "checkpoint_mb": args.checkpoint_mb,
        "levels": results,
        "latency_doubles_at": {q: latency_doubles_at(results, q) for q in ("p50", "p99")},
    }
    print(f"latency doubles at K = {report['latency_doubles_at']} (None: not within the levels)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


@contextmanager
def _server(args: argparse.Namespace, folder: Path) -> Iterator[tuple[str, int | None, str]]:
    """(URL, server pid or None, backend kind) of the server the levels load."""
    if args.tracking_uri:
        yield args.tracking_uri, None, "given server"
        return
    backend = args.backend_store_uri or f"sqlite:///{folder / 'server.db'}"
    with running_server(
        backend,
        folder / "artifacts",
        log_path=args.server_log or folder / "server.log",
        workers=args.workers,
    ) as (url, process):
        yield url, process.pid, backend.split(":", 1)[0]


def _machine() -> dict[str, str | int]:
    env = collect_environment("cpu", 1, "32")
    return {"cpu": env.host_cpu, "cores": env.host_cores, "mlflow": env.versions["mlflow"]}


def _print_level(level: dict) -> None:
    print(
        f"K={level['trainings']:>3}  p50 {level['latency_ms']['p50']:>7.1f} ms  "
        f"p99 {level['latency_ms']['p99']:>7.1f} ms  {level['writes_per_s']:>6.1f} writes/s  "
        f"{level['artifact_mb_per_s']:>5.2f} MB/s  epochs/s {level['epochs_per_s']:.2f} of "
        f"{level['epochs_per_s_asked']:.2f}  errors {level['errors']}  "
        f"cpu: client {level['client_cpu_percent']}% "
        f"server {level.get('server_cpu_percent', '?')}%",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
