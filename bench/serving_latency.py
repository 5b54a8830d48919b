"""The served classifier over REST against the same model loaded in this process.

Single-image requests one after another (p50/p99 latency), then batches of `--batch-size`
images (images/s), first to a `dlharness-serve` server, then to the pyfunc loaded here. The
images are real digits (8×8 greyscale); the model converts and resizes them as it would any
client's. Loopback only; it stops by itself after `--max-seconds` per phase.

Without `--server` it starts `dlharness-serve MODEL_URI` itself on a free loopback port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import requests

from dlharness.data.digits import digit_images
from dlharness.serving.classifier_logging import quiet_any_type_hint
from dlharness.serving.serve import serve_command, serve_env
from dlharness.store.server import free_port, is_loopback, stop_server, wait_until_healthy
from dlharness.tracking.provenance.environment import collect_environment
from dlharness.tracking.store_access import existing_store

SERVE_START_S = 120


@contextlib.contextmanager
def started_server(model_uri: str, tracking_uri: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        serve_command(model_uri, port, workers=1),
        env=serve_env(tracking_uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # The scoring server answers /health like the tracking server.
        wait_until_healthy(url, process, SERVE_START_S)
        yield url
    finally:
        stop_server(process)


def _timed(call: Callable[[], bool], count: int, deadline: float) -> tuple[list[float], int]:
    """Seconds per successful call, and the number of failed calls, until `deadline`."""
    seconds, failed = [], 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        ok = call()
        if ok:
            seconds.append(time.perf_counter() - started)
        else:
            failed += 1
    return seconds, failed


def _figures(single: list[float], batches: list[float], batch_size: int) -> dict[str, float]:
    return {
        "single_requests": len(single),
        "single_p50_ms": round(float(np.percentile(single, 50)) * 1000, 2),
        "single_p99_ms": round(float(np.percentile(single, 99)) * 1000, 2),
        "batches": len(batches),
        "batch_images_per_s": round(batch_size * len(batches) / sum(batches), 1),
    }


def measure(
    model_uri: str,
    server: str | None,
    tracking_uri: str,
    single_requests: int = 300,
    batch_requests: int = 20,
    batch_size: int = 256,
    max_seconds: float = 120,
) -> dict:
    """Latency and throughput through `server` (started here if None) and in this process."""
    raw, _ = digit_images()
    images = [image[0].numpy() for image in raw[:batch_size]]
    as_json = [image.tolist() for image in images]
    mlflow.set_tracking_uri(tracking_uri)
    report: dict = {"requests_failed": 0}
    with contextlib.ExitStack() as stack:
        url = server or stack.enter_context(started_server(model_uri, tracking_uri))

        def post(inputs: list) -> bool:
            response = requests.post(f"{url}/invocations", json={"inputs": inputs}, timeout=60)
            return response.status_code == 200

        post(as_json[:1])  # the first request loads what the server loads lazily
        deadline = time.monotonic() + max_seconds
        single, failed = _timed(lambda: post(as_json[:1]), single_requests, deadline)
        batches, failed_batches = _timed(lambda: post(as_json), batch_requests, deadline)
        report["requests_failed"] = failed + failed_batches
        report["server"] = _figures(single, batches, batch_size)
    with quiet_any_type_hint():
        model = mlflow.pyfunc.load_model(model_uri)
        model.predict(images[:1])
        deadline = time.monotonic() + max_seconds
        single, _ = _timed(lambda: bool(model.predict(images[:1])), single_requests, deadline)
        batches, _ = _timed(lambda: bool(model.predict(images)), batch_requests, deadline)
    report["in_process"] = _figures(single, batches, batch_size)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_uri")
    parser.add_argument("--server", default=None, help="a running dlharness-serve on loopback")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--single", type=int, default=300, help="single-image requests")
    parser.add_argument("--batches", type=int, default=20, help="batch requests")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=120, help="per phase")
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args()
    if args.server and not is_loopback(urlparse(args.server).hostname or ""):
        parser.error("--server must be on loopback (127.0.0.1 or localhost)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    report = measure(
        args.model_uri, args.server, existing_store(args.tracking_uri),
        args.single, args.batches, args.batch_size, args.max_seconds,
    )  # fmt: skip
    env = collect_environment("cpu", 1, "32")
    report = {
        "date": date.today().isoformat(),
        "machine": {"cpu": env.host_cpu, "cores": env.host_cores, "mlflow": env.versions["mlflow"]},
        "model_uri": args.model_uri,
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
