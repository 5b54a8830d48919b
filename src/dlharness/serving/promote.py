"""`dlharness-promote`: move a registered model's aliases, refuse a worse version, roll back."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError
from dlharness.serving.lifecycle import (
    CANDIDATE,
    CHAMPION,
    TAG_PREFIX,
    LifecycleError,
    Registry,
    WorseVersionError,
)
from dlharness.tracking.epoch_history import lower_is_better
from dlharness.tracking.store_access import existing_store

EXIT_REFUSED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-promote",
        description="Promote a registered model's version from one alias to another if it is "
        "at least as good on a metric its run logged; roll back; list versions.",
    )
    parser.add_argument("name", help="registered model name")
    parser.add_argument("--from", dest="source", default=CANDIDATE, help="(default: %(default)s)")
    parser.add_argument("--to", dest="target", default=CHAMPION, help="(default: %(default)s)")
    parser.add_argument(
        "--metric", default="test/acc", help="compared between the two runs (default: %(default)s)"
    )
    parser.add_argument(
        "--goal",
        choices=("max", "min"),
        default=None,
        help="whether higher or lower is better (default: min for *loss, else max)",
    )
    parser.add_argument("--force", action="store_true", help="promote even a worse version")
    parser.add_argument("--reason", default=None, help="a note recorded with the promotion")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--rollback", action="store_true", help="put --to back on its previous holder"
    )
    action.add_argument("--list", action="store_true", help="print versions, aliases, metrics")
    action.add_argument(
        "--checkpoint",
        metavar="TARGET",
        help="register the classifier of a stored checkpoint as a new version with alias "
        "candidate: models:/MODEL_ID (a checkpoint's LoggedModel), or a run id with --epoch",
    )
    parser.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="with --checkpoint RUN_ID: that epoch's checkpoint (default: the latest)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the registry's store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def versions_table(registry: Registry, name: str, metric: str) -> Table:
    aliases = registry.aliases(name)
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    table = Table(title=f"{name}: versions")
    for column in ("version", "aliases", metric, "run", "promoted", "by", "reason"):
        table.add_column(column)
    for version in registry.versions(name):
        number = str(version.version)
        try:
            value = f"{registry.metric(name, number, metric):.4f}"
        except LifecycleError:
            value = "–"
        tags = version.tags or {}
        table.add_row(
            number,
            ", ".join(by_version.get(number, [])),
            value,
            (version.run_id or "")[:8],
            tags.get(f"{TAG_PREFIX}at", ""),
            tags.get(f"{TAG_PREFIX}by", ""),
            tags.get(f"{TAG_PREFIX}reason", ""),
        )
    return table


def register_checkpoint(name: str, target: str, epoch: int | None, uri: str) -> int:
    # Imported here: --list and the alias moves answer without loading torch.
    from dlharness.serving.checkpoint_classifier import log_checkpoint_classifier

    logged = log_checkpoint_classifier(target, epoch, uri, register=name)
    print(
        f"{name}@{CANDIDATE} → version {logged.registered_version}: the classifier of "
        f"epoch {logged.epoch} of run {logged.run_id} ({logged.model_uri})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        if args.source == args.target:
            raise UsageError(f"--from and --to are both {args.source!r}")
        if args.epoch is not None and args.checkpoint is None:
            raise UsageError("--epoch needs --checkpoint RUN_ID")
        uri = existing_store(args.tracking_uri)
        if args.checkpoint is not None:
            return register_checkpoint(args.name, args.checkpoint, args.epoch, uri)
        registry = Registry(MlflowClient(uri))
        if args.list:
            console = Console() if sys.stdout.isatty() else Console(width=200)
            console.print(versions_table(registry, args.name, args.metric))
            return 0
        if args.rollback:
            move = registry.rollback(args.name, args.target)
        else:
            goal = args.goal or ("min" if lower_is_better(args.metric) else "max")
            move = registry.promote(
                args.name, args.source, args.target, args.metric,
                lower_is_better=goal == "min", force=args.force, note=args.reason,
            )  # fmt: skip
    except WorseVersionError as exc:
        print(f"dlharness-promote: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (UsageError, LifecycleError) as exc:
        print(f"dlharness-promote: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MlflowException as exc:
        print(f"dlharness-promote: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    was = f" (was version {move.replaced})" if move.replaced not in (None, move.version) else ""
    print(f"{move.name}@{move.alias} → version {move.version}{was}: {move.reason}")
    return 0
