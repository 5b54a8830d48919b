"""`dlharness-sync SPOOL_DIR`: replay writes spooled during a tracking outage into their run."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dlharness.errors import EXIT_USAGE, OneLineArgumentParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-sync",
        description="Send what a training run spooled while the tracking server was down.",
    )
    parser.add_argument(
        "spool", type=Path, nargs="+", metavar="SPOOL_DIR", help="a run's spool folder(s)"
    )
    parser.add_argument(
        "--tracking-uri",
        help="where to send (default: the URI the run was training against)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Imported here so that --help answers without loading MLflow.
    from dlharness.serving.model_logging import FINAL_MODEL_OP, replay_final_model
    from dlharness.tracking.checkpointing.logged_models import MODEL_REPLAYERS
    from dlharness.tracking.spool import SYNCED, ReplayError, Spool, replay
    from dlharness.tracking.store_access import check_tracking_uri

    try:
        for folder in args.spool:
            try:
                spool = Spool.load(folder)
            except FileNotFoundError as exc:
                raise UsageError(str(exc)) from None
            if not spool.pending:
                done = " (already replayed)" if (folder / SYNCED).exists() else ""
                print(f"{folder}: nothing to replay{done}")
                continue
            uri = args.tracking_uri or spool.meta["tracking_uri"]
            check_tracking_uri(uri)
            count = replay(spool, uri, {FINAL_MODEL_OP: replay_final_model, **MODEL_REPLAYERS})
            print(f"{folder}: {count} spooled operations replayed into run {spool.run_id}")
    except UsageError as exc:
        print(f"dlharness-sync: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplayError as exc:
        print(f"dlharness-sync: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
