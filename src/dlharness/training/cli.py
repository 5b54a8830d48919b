"""Command line: flags ↔ config, and bad input reported on one line with exit code 2."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlharness.errors import EXIT_USAGE, BadImageError, OneLineArgumentParser, UsageError
from dlharness.tracking.interruption import TrainingInterrupted
from dlharness.tracking.worker import StorageError
from dlharness.training.config import (
    SAFE_ON_RESUME,
    TrainConfig,
    declared_keys,
    load_config,
    shown,
    value_at,
)
from dlharness.training.output import plain_training_output

if TYPE_CHECKING:
    from dlharness.training.train import TrainResult

# The flags, from the config's declaration: (flag, dotted key, type, choices, help) for values,
# (flag, dotted key, value set, help) for the switches a bool key gets, and `--tag`, one
# KEY=VALUE a time into `tracking.tags`.
FLAGS = tuple(
    (key.flag, key.dotted, key.value_type, key.choices, key.help)
    for key in declared_keys()
    if key.flag is not None and key.value_type not in (bool, dict)
)
SWITCHES = tuple(
    (key.flag, key.dotted, not key.default, key.help)
    for key in declared_keys()
    if key.flag is not None and key.value_type is bool
)
CONFIG_DESTS = frozenset({f[1] for f in FLAGS} | {s[1] for s in SWITCHES})
[TAG_KEY] = [key for key in declared_keys() if key.value_type is dict]
TAG_FLAG = (TAG_KEY.flag, TAG_KEY.dotted)


def flag_keys() -> list[tuple[str, str]]:
    """(flag, dotted config key) of every flag that sets one."""
    return [(flag, dotted) for flag, dotted, *_ in (*FLAGS, *SWITCHES)] + [TAG_FLAG]


def resumable_flags() -> list[str]:
    """The flags of the keys a resume may change (`SAFE_ON_RESUME`), as --help orders them."""
    return [flag for flag, dotted in flag_keys() if dotted in SAFE_ON_RESUME]


def unflagged_resumable() -> list[str]:
    """The keys a resume may change that no flag sets (a config file does)."""
    return sorted(SAFE_ON_RESUME - {dotted for _, dotted in flag_keys()})


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="dlharness-train",
        description="Train an image classifier with every epoch tracked in MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags override values from --config; --print-config shows the result.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config (default: none; the built-in defaults equal configs/default.yaml)",
    )
    for flag, dotted, type_, choices, text in FLAGS:
        parser.add_argument(
            flag,
            dest=dotted,
            type=type_,
            choices=choices,
            metavar=None if choices else flag.lstrip("-").upper().replace("-", "_"),
            default=None,
            help=f"{text} (default: {shown(value_at(TrainConfig(), dotted))})",
        )
    for flag, dotted, value, text in SWITCHES:
        default = "off" if value else "on; this flag turns it off"
        parser.add_argument(
            flag,
            dest=dotted,
            action="store_const",
            const=value,
            help=f"{text} (default: {default})",
        )
    parser.add_argument(
        TAG_KEY.flag,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{TAG_KEY.help} (default: none)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    exports = parser.add_argument_group(
        "files for other tools", "written from the finished run's metrics as MLflow holds them"
    )
    exports.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="JSON of each metric's last value by stage, e.g. DVC metrics (default: none)",
    )
    exports.add_argument(
        "--plots-dir",
        metavar="DIR",
        help="train.csv and val.csv, a row per epoch, e.g. DVC plots (default: none)",
    )
    resume = parser.add_argument_group(
        "resume",
        "continue a logged run from its checkpoint; its logged config is reused and only "
        f"{', '.join(resumable_flags())} may change (and in a config "
        f"{', '.join(unflagged_resumable())})",
    )
    resume.add_argument(
        "--resume",
        metavar="RUN",
        help="run id (latest checkpoint), runs:/RUN_ID/checkpoints/epoch_N, or models:/MODEL_ID "
        "(a checkpoint's LoggedModel) (default: none)",
    )
    resume.add_argument(
        "--resume-epoch",
        type=int,
        metavar="N",
        help="resume from epoch N's checkpoint instead of the latest (default: latest)",
    )
    resume.add_argument(
        "--fork",
        action="store_true",
        help="continue in a new run tagged with its parent, not in the same run (default: same)",
    )
    resume.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds objects other than tensors and plain data, which may "
        "run code: only one you trust (default: refuse it)",
    )
    return parser


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--tag expects KEY=VALUE, got '{item}'")
        tags[key.strip()] = value
    return tags


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line, as dotted keys."""
    values = vars(args)
    overrides = {key: values[key] for key in CONFIG_DESTS if values[key] is not None}
    tags = parse_tags(args.tag)
    if tags:
        overrides["tracking.tags"] = tags
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return load_config(args.config, overrides_from_args(args))


def with_flag_name(message: str) -> str:
    """'optim.lr must be …' → 'optim.lr (--lr) must be …': name the flag that fixes it."""
    for flag, dotted, *_ in FLAGS:
        if message.startswith(f"{dotted} "):
            return f"{dotted} ({flag}){message[len(dotted) :]}"
    return message


def resume_command(run_id: str, tracking_uri: str | None) -> str:
    """The exact command that continues run `run_id`, to paste as is."""
    script = sys.argv[0]
    program = [sys.executable, script] if script.endswith(".py") else [Path(script).name]
    return shlex.join([*program, "--resume", run_id, "--tracking-uri", tracking_uri or ""])


def resume_hint(exc: TrainingInterrupted) -> str:
    """What an interrupted run left, and the command that continues it."""
    if exc.run_id is None:
        return "No run was started."
    command = resume_command(exc.run_id, exc.tracking_uri)
    return f"Run {exc.run_id} ended KILLED with its state stored; resume: {command}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plain_training_output()
    try:
        if args.resume is None:
            if args.resume_epoch is not None or args.fork or args.trust_checkpoint:
                raise UsageError("--resume-epoch, --fork and --trust-checkpoint need --resume RUN")
            cfg, resume = config_from_args(args), None
        else:
            if args.config is not None:
                raise UsageError(
                    "--config cannot be combined with --resume: the run's config is used"
                )
            # Imported here so that --help and config errors answer without loading torch.
            from dlharness.training.resume import prepare_resume

            overrides = overrides_from_args(args)
            uri = load_config(None, overrides).resolved_tracking_uri()
            resume = prepare_resume(
                args.resume,
                args.resume_epoch,
                overrides,
                uri,
                args.fork,
                trusted=args.trust_checkpoint,
            )
            cfg = resume.config
        if args.print_config:
            print(cfg.to_yaml(), end="")
            if resume is not None:
                resume.cleanup()
            return 0
        from dlharness.training.collector import freeze_long_lived_objects
        from dlharness.training.train import train

        freeze_long_lived_objects()
        result = train(cfg, resume, fast_package_index=True)
    except UsageError as exc:
        print(f"dlharness-train: error: {with_flag_name(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(f"dlharness-train: {exc}. {resume_hint(exc)}", file=sys.stderr)
        return exc.exit_code
    except BadImageError as exc:
        command = resume_command(exc.run_id, exc.tracking_uri)
        print(
            f"dlharness-train: error: {exc.one_line()}; run {exc.run_id} ended FAILED. Put the "
            f"file back as it was and resume: {command}; or leave such files out of a new run "
            "with --skip-bad-images",
            file=sys.stderr,
        )
        return 1
    except StorageError as exc:
        print(
            f"dlharness-train: error: {exc}; training stopped and run {exc.run_id} ended FAILED "
            "(free space or fix the artifact store; its stored checkpoints still resume)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("dlharness-train: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    if result is None:  # a DDP rank other than 0: rank 0 reports
        return 0
    export_metrics(args, result)
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.test_metrics.items()))
    print(f"run {result.run_id} finished: {metrics}")
    if result.tracking_uri.startswith(("http://", "https://")):
        print(f"compare epochs: {result.tracking_uri}/#/experiments/{result.experiment_id}")
    else:
        ui = shlex.join([mlflow_command(), "ui", "--backend-store-uri", result.tracking_uri])
        print(f"compare epochs: {ui}")
    if result.spooled is not None:
        # The last line: the run stays RUNNING on the server until these writes reach it.
        sys.stdout.flush()
        print(
            f"dlharness-train: the tracking server did not answer before the end: "
            f"{result.spooled_writes} writes of run {result.run_id} wait in {result.spooled}; "
            f"once it answers, run: dlharness-sync {result.spooled}",
            file=sys.stderr,
        )
    return 0


def export_metrics(args: argparse.Namespace, result: TrainResult) -> None:
    if args.metrics_file is None and args.plots_dir is None:
        return
    if result.spooled is not None:
        print(
            "dlharness-train: --metrics-file/--plots-dir not written: the tracking server "
            "holds the metrics only after dlharness-sync",
            file=sys.stderr,
        )
        return
    from mlflow.tracking import MlflowClient

    from dlharness.training.metrics_export import write_epoch_csvs, write_metrics_json

    client = MlflowClient(result.tracking_uri)
    if args.metrics_file is not None:
        write_metrics_json(client, result.run_id, Path(args.metrics_file))
    if args.plots_dir is not None:
        write_epoch_csvs(client, result.run_id, Path(args.plots_dir))


def mlflow_command() -> str:
    """The `mlflow` of this interpreter's environment: typed as printed it works outside an
    activated virtual environment too."""
    beside = Path(sys.executable).with_name("mlflow")
    return str(beside) if beside.is_file() else "mlflow"


if __name__ == "__main__":
    sys.exit(main())
