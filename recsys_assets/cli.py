"""`recsys`: the command line. Each role registers its own subcommands.

A module in COMMAND_MODULES exposes `register(subparsers)`, adding its subcommands with
`set_defaults(handler=...)`; a handler takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

import dagster as dg

from recsys_assets.config import ConfigError
from recsys_assets.contracts import ContractViolation
from recsys_assets.pipeline.runner import TrainingFailed
from recsys_assets.warehouse import WarehouseError

COMMAND_MODULES = (
    "recsys_assets.data.commands",
    "recsys_assets.pipeline.commands",
    "recsys_assets.publish.commands",
    "recsys_assets.serving.commands",
    "recsys_assets.evaluation.commands",
    "recsys_assets.channels.commands",
    "recsys_assets.deployment.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Batch scoring and precomputed recommendations (a Dagster code location).",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and Dagster's full event log for runs",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Beta/preview notices about Dagster APIs we chose on purpose are noise on a terminal.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries say what went wrong (warnings); our own modules also what they did (info).
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("recsys_assets").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, ContractViolation, WarehouseError, OSError, ValueError) as error:
        # The errors bad input and storage raise, each worded where it arises to name the
        # file and the problem; anything else is a bug and keeps its traceback.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = lines[0] if lines else type(error).__name__
        for line in lines[1:]:  # one line on stderr, findings apart
            message += (" " if message.endswith(":") else "; ") + line
        print(f"recsys {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingFailed as error:
        # A run that failed, not a bad argument: Dagster logged the step's traceback.
        print(f"recsys {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
