"""Comparing epochs and runs from the tracking store: tables, CSV, curves, re-evaluation."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.tracking.checkpointing.logged_models import EPOCH_TAG, MODEL_TYPE
from dlharness.tracking.epoch_history import lower_is_better
from dlharness.tracking.store_access import existing_store
from dlharness.training.config import TrackingConfig

DEFAULT_METRICS = ("val/loss", "val/acc")
# The experiment the harness trains into by default: what `compare` shows without arguments.
DEFAULT_EXPERIMENT = TrackingConfig.experiment
# (column, param) and (column, tag) of the --summary view.
SUMMARY_PARAMS = (
    ("dataset", "data.dataset"),
    ("model", "model.name"),
    ("optimizer", "optim.optimizer"),
    ("lr", "optim.lr"),
    ("batch", "data.batch_size"),
    ("epochs", "trainer.max_epochs"),
)
SUMMARY_TAGS = (
    ("device", "env.accelerator"),
    ("precision", "env.precision"),
    ("gpus", "gpu.count"),
    ("gpu", "gpu.name"),
)
TEST_METRICS = ("test/acc", "test/f1", "test/auroc", "test/loss")
CONFUSION_IMAGE = re.compile(r"val_confusion_matrix\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class RunCurves:
    """One run's per-epoch values of the chosen metrics."""

    run: Run
    values: dict[str, dict[int, float]]  # metric → epoch → value

    @property
    def label(self) -> str:
        return f"{self.run.info.run_name} ({self.run.info.run_id[:8]})"

    def best_epoch(self, metric: str) -> int | None:
        series = self.values.get(metric) or {}
        if not series:
            return None
        pick = min if lower_is_better(metric) else max
        return pick(series, key=lambda epoch: (series[epoch], -epoch))


class Comparison:
    """Reads runs and their epoch metrics from one tracking store."""

    def __init__(self, tracking_uri: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri

    def find_runs(
        self, experiment: str | None, run_ids: Sequence[str], filter_string: str | None
    ) -> list[Run]:
        if run_ids:
            return [self.get_run(run_id) for run_id in run_ids]
        experiment = experiment or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in self.client.search_experiments())
            raise UsageError(f"no experiment '{experiment}'; experiments: {', '.join(names)}")
        try:
            runs = self.client.search_runs(
                [found.experiment_id], filter_string or "", order_by=["attributes.start_time ASC"]
            )
        except MlflowException as exc:
            raise UsageError(f"--filter: {str(exc).splitlines()[0]}") from None
        if not runs:
            raise UsageError(f"experiment '{experiment}' has no runs matching the filter")
        return runs

    def get_run(self, run_id: str) -> Run:
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise UsageError(f"run {run_id} not found in {self.tracking_uri}") from None

    def curves(self, runs: Sequence[Run], metrics: Sequence[str]) -> list[RunCurves]:
        known = sorted({key for run in runs for key in run.data.metrics})
        for metric in metrics:
            if metric not in known:
                epoch_metrics = [k for k in known if k.startswith(("train/", "val/", "test/"))]
                raise UsageError(
                    f"no run has metric '{metric}'; metrics: {', '.join(epoch_metrics)}"
                )
        return [
            RunCurves(
                run,
                {
                    metric: {
                        m.step: m.value
                        for m in self.client.get_metric_history(run.info.run_id, metric)
                    }
                    for metric in metrics
                },
            )
            for run in runs
        ]


# Rendering


def epoch_cells(
    curves: Sequence[RunCurves], metrics: Sequence[str]
) -> tuple[list[int], list[tuple[RunCurves, str, int | None]]]:
    """The epochs any run logged, and one (run, metric, best epoch) per column of the table."""
    epochs = sorted({e for run in curves for series in run.values.values() for e in series})
    columns = [(run, metric, run.best_epoch(metric)) for run in curves for metric in metrics]
    return epochs, columns


def epoch_table(curves: Sequence[RunCurves], metrics: Sequence[str]) -> list[list[str]]:
    """Rows of the epoch table: header, then one row per epoch; the best epoch has a ★."""
    epochs, columns = epoch_cells(curves, metrics)
    rows = [["epoch", *(f"{run.label} {metric}" for run, metric, _ in columns)]]
    for epoch in epochs:
        row = [str(epoch)]
        for run, metric, best in columns:
            value = run.values[metric].get(epoch)
            star = " ★" if best == epoch else ""
            row.append("" if value is None else f"{value:.4f}{star}")
        rows.append(row)
    return rows


def write_csv(path: Path, curves: Sequence[RunCurves], metrics: Sequence[str]) -> None:
    """The epoch table with full-precision values; a `best` column per run and metric."""
    epochs, columns = epoch_cells(curves, metrics)
    header = ["epoch"]
    for run, metric, _ in columns:
        header += [f"{run.run.info.run_id}/{metric}", f"{run.run.info.run_id}/{metric}/best"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for epoch in epochs:
            row: list[object] = [epoch]
            for run, metric, best in columns:
                value = run.values[metric].get(epoch)
                row += ["" if value is None else repr(value), best == epoch]
            writer.writerow(row)


def print_table(console: Console, title: str, rows: list[list[str]]) -> None:
    table = Table(title=title, header_style="bold")
    for name in rows[0]:
        # Fold rather than cut: a run id or value must never lose characters.
        table.add_column(name, justify="right", overflow="fold")
    for row in rows[1:]:
        table.add_row(*[f"[bold green]{cell}[/]" if "★" in cell else cell for cell in row])
    console.print(table)


def plot_curves(path: Path, curves: Sequence[RunCurves], metrics: Sequence[str]) -> None:
    """One panel per metric, one line per run, the best epoch of each run ringed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6 * len(metrics), 4.2), dpi=100, layout="constrained")
    for panel, metric in enumerate(metrics, start=1):
        ax = fig.add_subplot(1, len(metrics), panel)
        for run in curves:
            series = run.values[metric]
            epochs = sorted(series)
            (line,) = ax.plot(
                epochs, [series[e] for e in epochs], marker="o", ms=3, label=run.label
            )
            best = run.best_epoch(metric)
            if best is not None:
                ax.plot([best], [series[best]], "o", ms=11, mfc="none", color=line.get_color())
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)


def confusion_strip(client: MlflowClient, run_id: str, epochs: Sequence[int], path: Path) -> None:
    """The run's logged validation confusion matrices of `epochs`, side by side in one PNG."""
    from PIL import Image

    by_step: dict[int, str] = {}
    for item in client.list_artifacts(run_id, "images"):
        if match := CONFUSION_IMAGE.search(item.path):
            by_step[int(match.group(1))] = item.path
    missing = [e for e in epochs if e not in by_step]
    if missing:
        raise UsageError(
            f"run {run_id} has no confusion matrix image for epoch {missing[0]}; "
            f"epochs with one: {', '.join(map(str, sorted(by_step))) or 'none'}"
        )
    with tempfile.TemporaryDirectory() as scratch:
        images = [
            Image.open(client.download_artifacts(run_id, by_step[e], scratch)).convert("RGB")
            for e in epochs
        ]
        strip = Image.new(
            "RGB", (sum(i.width for i in images), max(i.height for i in images)), "white"
        )
        x = 0
        for image in images:
            strip.paste(image, (x, 0))
            x += image.width
        strip.save(path)


def summary_rows(
    curves: Sequence[RunCurves], sort_by: str, tag_columns: Sequence[tuple[str, str]] = ()
) -> list[list[str]]:
    header = [
        "run",
        *(column for column, _ in tag_columns),
        "status",
        *(column for column, _ in SUMMARY_PARAMS),
        "best epoch",
        f"best {sort_by}",
        *TEST_METRICS,
        "duration s",
        *(column for column, _ in SUMMARY_TAGS),
    ]
    records = []
    for run in curves:
        data = run.run.data
        best = run.best_epoch(sort_by)
        best_value = run.values[sort_by].get(best) if best is not None else None
        info = run.run.info
        duration = (info.end_time - info.start_time) / 1000 if info.end_time else None
        record = [
            run.label,
            *(data.tags.get(t, "") for _, t in tag_columns),
            info.status,
            *(data.params.get(p, "") for _, p in SUMMARY_PARAMS),
            "" if best is None else str(best),
            "" if best_value is None else f"{best_value:.4f}",
            *(f"{data.metrics[m]:.4f}" if m in data.metrics else "" for m in TEST_METRICS),
            "" if duration is None else f"{duration:.1f}",
            *(data.tags.get(t, "") for _, t in SUMMARY_TAGS),
        ]
        records.append((best_value, record))
    sign = 1 if lower_is_better(sort_by) else -1
    records.sort(key=lambda r: (r[0] is None, sign * (r[0] or 0)))
    return [header, *(record for _, record in records)]


def evaluate_epochs(
    run: Run, epochs: Sequence[int], split: str, tracking_uri: str
) -> list[list[str]]:
    """Re-evaluate the run's stored checkpoints of `epochs` on `split`, as logged at the time."""
    import torch

    from dlharness.models.classifier import ClassifierModule
    from dlharness.tracking.checkpointing.artifacts import stored_epochs
    from dlharness.tracking.params import flatten
    from dlharness.training.components import build_datamodule
    from dlharness.training.config import load_config
    from dlharness.training.evaluation import evaluate
    from dlharness.training.resume import logged_config, stored_state

    client = MlflowClient(tracking_uri)
    run_id = run.info.run_id
    available = stored_epochs(client, run_id)
    missing = [e for e in epochs if e not in available]
    if missing:
        raise UsageError(
            f"run {run_id} has no stored checkpoint for epoch {missing[0]}; "
            f"stored: {', '.join(map(str, available)) or 'none'}"
        )
    cfg = load_config(None, flatten(logged_config(client, run_id)))
    datamodule = build_datamodule(cfg.data, cfg.seed)
    datamodule.prepare_data()
    datamodule.setup()
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = [
        "epoch",
        *(f"{split}/{m}" for m in ("loss", "acc", "precision", "recall", "f1", "auroc")),
    ]
    rows = [header]
    with tempfile.TemporaryDirectory() as scratch:
        for epoch in epochs:
            state = stored_state(run_id, epoch, tracking_uri, Path(scratch) / str(epoch))
            module = ClassifierModule(**state["hyper_parameters"])
            module.load_state_dict(state["state_dict"])
            metrics = evaluate(module, loader, device, stage=split).metrics
            rows.append([str(epoch), *(f"{metrics[key]:.6f}" for key in header[1:])])
    return rows


# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-compare",
        description="Compare the epochs of runs, or the epochs of one run, from an MLflow store.",
    )
    parser.add_argument(
        "run_ids", nargs="*", metavar="RUN_ID", help="runs to compare (default: none)"
    )
    parser.add_argument(
        "--experiment",
        help=f"compare the runs of this experiment (default: {DEFAULT_EXPERIMENT}, "
        "unless run ids are given)",
    )
    parser.add_argument(
        "--filter", help="MLflow search filter, e.g. \"params.`optim.lr` = '0.01'\" (default: none)"
    )
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metrics (default: %(default)s)",
    )
    parser.add_argument(
        "--csv", type=Path, metavar="PATH", help="also write the table as CSV (default: no)"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH.png",
        help="write curves (or, with --run, the confusion matrices) (default: no)",
    )
    parser.add_argument(
        "--log-to", metavar="RUN_ID", help="log the --plot image into this run (default: no)"
    )
    parser.add_argument(
        "--run", metavar="RUN_ID", help="compare epochs of this one run (default: no)"
    )
    parser.add_argument(
        "--epochs", help="with --run: epochs to put side by side, e.g. 3,10 (default: none)"
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="with --run: re-evaluate those epochs' checkpoints (default: off)",
    )
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="split for --evaluate (default: %(default)s)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="one row per run, sorted by the first metric (default: off)",
    )
    parser.add_argument(
        "--sweep",
        metavar="PARENT_RUN_ID",
        help="the trials of a dlharness-sweep, one row each, best first by the sweep's metric "
        "(default: no)",
    )
    parser.add_argument(
        "--checkpoints",
        action="store_true",
        help="one row per checkpoint model (LoggedModel) of the runs, best first by the first "
        "metric, with its model id for --resume models:/ID (default: off)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def _parse_epochs(text: str | None) -> list[int]:
    if not text:
        raise UsageError("--run needs --epochs, e.g. --epochs 3,10")
    try:
        epochs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--epochs expects comma-separated epoch numbers, got '{text}'") from None
    if not epochs or min(epochs) < 0:
        raise UsageError(f"--epochs expects epoch numbers >= 0, got '{text}'")
    return epochs


def compare_epochs_of_run(
    args: argparse.Namespace, comparison: Comparison, console: Console
) -> None:
    run = comparison.get_run(args.run)
    epochs = _parse_epochs(args.epochs)
    epoch_keys = sorted(k for k in run.data.metrics if k.startswith(("train/", "val/")))
    [curves] = comparison.curves([run], epoch_keys)
    logged = sorted({e for series in curves.values.values() for e in series})
    missing = [e for e in epochs if e not in logged]
    if missing:
        raise UsageError(
            f"run {args.run} has no epoch {missing[0]}; epochs: {logged[0]}..{logged[-1]}"
            if logged
            else f"run {args.run} has no epoch metrics"
        )
    rows = [["metric", *(f"epoch {e}" for e in epochs)]]
    rows += [[k, *(f"{curves.values[k][e]:.4f}" for e in epochs)] for k in epoch_keys]
    print_table(console, f"{curves.label}: epochs side by side", rows)
    image = args.plot or Path(f"confusion-{args.run[:8]}-epochs-{'-'.join(map(str, epochs))}.png")
    confusion_strip(comparison.client, args.run, epochs, image)
    console.print(f"validation confusion matrices of epochs {', '.join(map(str, epochs))}: {image}")
    if args.evaluate:
        rows = evaluate_epochs(run, epochs, args.split, comparison.tracking_uri)
        print_table(
            console, f"{curves.label}: checkpoints re-evaluated on the {args.split} split", rows
        )
        if args.csv:
            with args.csv.open("w", newline="") as fh:
                csv.writer(fh).writerows(rows)


def checkpoint_rows(
    client: MlflowClient, runs: Sequence[Run], metrics: Sequence[str]
) -> list[list[str]]:
    """One row per checkpoint model of `runs`, best first by the first of `metrics` (as
    MLflow's `search_logged_models` orders them by a linked metric)."""
    sort_by = metrics[0]
    header = ["model id", "run", "epoch", *metrics, "tags"]
    experiments = sorted({run.info.experiment_id for run in runs})
    names = {run.info.run_id: run.info.run_name for run in runs}
    models = []
    token = None
    while True:
        page = client.search_logged_models(
            experiments,
            filter_string=f"model_type = '{MODEL_TYPE}'",
            order_by=[{"field_name": f"metrics.{sort_by}", "ascending": lower_is_better(sort_by)}],
            page_token=token,
        )
        models += [m for m in page if m.source_run_id in names]
        token = page.token
        if not token:
            break
    rows = [header]
    for model in models:
        values = {m.key: m.value for m in model.metrics}
        roles = [role for role in ("latest", "best") if f"dlharness.{role}" in model.tags]
        cells = [f"{values[k]:.4f}" if k in values else "–" for k in metrics]
        epoch = model.tags.get(EPOCH_TAG, "")
        rows.append([model.model_id, names[model.source_run_id], epoch, *cells, ", ".join(roles)])
    return rows


def compare_checkpoints(args: argparse.Namespace, comparison: Comparison, console: Console) -> None:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise UsageError("--metrics needs at least one metric name")
    runs = comparison.find_runs(args.experiment, args.run_ids, args.filter)
    rows = checkpoint_rows(comparison.client, runs, metrics)
    if len(rows) == 1:
        raise UsageError("these runs have no checkpoint models (tracker.logged_models is off?)")
    print_table(console, f"checkpoint models by {metrics[0]}, best first", rows)
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        console.print(f"table written to {args.csv}")


SWEEP_COLUMNS = (("trial", "sweep.trial"), ("state", "sweep.state"))


def compare_sweep(args: argparse.Namespace, comparison: Comparison, console: Console) -> None:
    parent = comparison.get_run(args.sweep)
    metric = parent.data.params.get("sweep.metric")
    if metric is None:
        raise UsageError(f"run {args.sweep} is not the parent run of a dlharness-sweep")
    trials = comparison.client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{args.sweep}'"
    )
    if not trials:
        raise UsageError(f"sweep {args.sweep} has no trial runs yet")
    others = [m.strip() for m in args.metrics.split(",") if m.strip() and m.strip() != metric]
    curves = comparison.curves(trials, [metric, *others])
    title = f"sweep {parent.info.run_name}: trials by {metric}, best first"
    rows = summary_rows(curves, metric, SWEEP_COLUMNS)
    print_table(console, title, rows)
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        console.print(f"table written to {args.csv}")


def compare_runs(args: argparse.Namespace, comparison: Comparison, console: Console) -> None:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise UsageError("--metrics needs at least one metric name")
    runs = comparison.find_runs(args.experiment, args.run_ids, args.filter)
    curves = comparison.curves(runs, metrics)
    if args.summary:
        print_table(console, f"runs by {metrics[0]}", summary_rows(curves, metrics[0]))
    else:
        print_table(
            console, "per-epoch metrics (★ best epoch of each run)", epoch_table(curves, metrics)
        )
    if args.csv:
        write_csv(args.csv, curves, metrics)
        console.print(f"table written to {args.csv}")
    if args.plot:
        plot_curves(args.plot, curves, metrics)
        console.print(f"curves written to {args.plot}")
        if args.log_to:
            comparison.get_run(args.log_to)
            comparison.client.log_artifact(args.log_to, str(args.plot), "comparisons")
            console.print(f"logged as comparisons/{args.plot.name} in run {args.log_to}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A terminal gets its own width; a file or pipe gets room for the widest summary.
    console = Console() if sys.stdout.isatty() else Console(width=250)
    try:
        uri = existing_store(args.tracking_uri)
        if args.log_to and not args.plot:
            raise UsageError("--log-to needs --plot PATH.png")
        for run_id in [*args.run_ids, *filter(None, [args.run, args.log_to, args.sweep])]:
            if not _RUN_ID.match(run_id):
                raise UsageError(f"'{run_id}' is not a run id (32 hex digits)")
        comparison = Comparison(uri)
        if args.sweep:
            compare_sweep(args, comparison, console)
        elif args.checkpoints:
            compare_checkpoints(args, comparison, console)
        elif args.run:
            compare_epochs_of_run(args, comparison, console)
        else:
            if args.epochs or args.evaluate:
                raise UsageError("--epochs and --evaluate go with --run RUN_ID")
            compare_runs(args, comparison, console)
    except UsageError as exc:
        print(f"dlharness-compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0
