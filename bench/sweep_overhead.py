"""Per-trial overhead of dlharness-sweep: the seconds between one trial's last training batch and
the next trial's first, in one long-lived worker (`python scripts/bench_sweep.py -h`).

That gap holds the end of a trial (test evaluation, model logging, the parent's update, Optuna's
bookkeeping) and the start of the next (config, data, network, a new MLflow run, sanity check).
The timing callback rides in through `dlharness.training.train.train`, wrapped here: nothing of the
benchmark is in the package.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import lightning as L
import yaml

import dlharness.training.train as harness_train
from dlharness.sweeps import sweep
from dlharness.tracking.provenance.environment import collect_environment

BASE = {
    "model": {"width": 16},
    "trainer": {"accelerator": "cpu"},
    "tracking": {"experiment": "bench-sweep"},
}


class BatchClock(L.Callback):
    """Wall-clock times of each fit's first batch start and last batch end."""

    def __init__(self, marks: list[tuple[float, float]]) -> None:
        self.marks = marks
        self.first: float | None = None
        self.last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.marks.append((self.first, self.last))


def measure(trials: int, epochs: int, folder: Path) -> dict:
    marks: list[tuple[float, float]] = []
    original = harness_train.train

    def timed_train(cfg, resume=None, *, callbacks=(), **kwargs):
        return original(cfg, resume, callbacks=[*callbacks, BatchClock(marks)], **kwargs)

    harness_train.train = timed_train
    base = folder / "base.yaml"
    base.write_text(yaml.safe_dump(BASE))
    sweep_file = folder / "bench.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "metric": {"name": "val/acc", "goal": "maximize"},
                "method": "random",
                "trials": trials,
                "parameters": {
                    "optim.lr": {"distribution": "log_uniform", "min": 1e-3, "max": 1e-2},
                    "trainer.max_epochs": epochs,
                },
                "pruner": {"type": "none"},
            }
        )
    )
    started = time.perf_counter()
    try:
        code = sweep.main([
            "--config", str(sweep_file), "--storage", f"sqlite:///{folder / 'study.db'}",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
        ])  # fmt: skip
    finally:
        harness_train.train = original
    total = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"the sweep failed with exit code {code}")
    gaps = [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(marks)]
    training = [last - first for first, last in marks]
    return {
        "trials": trials,
        "epochs_per_trial": epochs,
        "overhead_s": {
            "median": round(statistics.median(gaps), 3),
            "min": round(min(gaps), 3),
            "max": round(max(gaps), 3),
            "each": [round(g, 3) for g in gaps],
        },
        "training_s_per_trial_median": round(statistics.median(training), 3),
        "sweep_wall_s": round(total, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON report")
    args = parser.parse_args()
    if args.trials < 2:
        parser.error("--trials must be at least 2 (an overhead sits between two trials)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="dlharness-bench-sweep-") as folder:
        report = measure(args.trials, args.epochs, Path(folder))
    env = collect_environment("cpu", 1, "32")
    report = {
        "date": date.today().isoformat(),
        "machine": {"cpu": env.host_cpu, "cores": env.host_cores, "mlflow": env.versions["mlflow"]},
        "data": "digits",
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
