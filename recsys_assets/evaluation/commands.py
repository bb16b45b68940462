"""`recsys evaluate`: the offline evaluation from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from recsys_assets.evaluation.evaluate import (
    DEFAULT_HOLDOUT,
    DEFAULT_K,
    DEFAULT_SEED,
    DEFAULT_SURFACES,
    EvaluationError,
    evaluate,
)
from recsys_assets.warehouse import Warehouse


def register(subparsers: Any) -> None:
    """Add the `evaluate` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="offline evaluation: temporal holdout, pipeline on the past, metrics vs baselines",
        description=(
            "Hold out each user's last interactions (--holdout, by time), run the pipeline on "
            "the rest in a scratch warehouse (yours is only read), and score each surface's "
            "lists against the held-out positives next to popularity, item-kNN, ALS and "
            "EASE baselines on the same split: Recall, nDCG, hit rate, catalog coverage and "
            "category diversity at K; a surface with an experiment also gets its arms "
            "compared (each arm's serving mode on its subjects, every mode on all). Prints a "
            "table, then one JSON line. RECSYS_CONFIG "
            "picks the configuration to evaluate (e.g. a new slate policy) before you "
            "publish with it. See docs/EVALUATION.md."
        ),
    )
    parser.add_argument(
        "--surface",
        action="append",
        help=f"surface to evaluate (repeatable; default {', '.join(DEFAULT_SURFACES)})",
    )
    parser.add_argument(
        "--k", type=int, default=DEFAULT_K, help=f"list depth scored (default {DEFAULT_K})"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help=f"share of each user's latest interactions held out (default {DEFAULT_HOLDOUT})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=(
            "seed for timestamp ties, the ALS baseline and EASE's tuning holdout "
            f"(default {DEFAULT_SEED})"
        ),
    )
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    warehouse = Warehouse.from_env()
    try:
        report = evaluate(
            warehouse,
            surfaces=args.surface or DEFAULT_SURFACES,
            k=args.k,
            holdout=args.holdout,
            seed=args.seed,
            progress=_say,
        )
    except EvaluationError as error:
        print(f"recsys evaluate: error: {error}", file=sys.stderr)
        return 1
    print(report.text_table())
    for evaluation in report.surfaces:
        wins = evaluation.beats_baselines()
        verdict = ", ".join(
            f"{metric}@{report.k} {'beats' if won else 'does NOT beat'} every baseline"
            for metric, won in wins.items()
        )
        print(f"{evaluation.surface} ({evaluation.lists_source}): {verdict}")
        for note in evaluation.notes:
            print(f"  note: {note}")
        if evaluation.experiment is not None:
            print("\n".join(evaluation.experiment.text_lines(report.k)))
    print(json.dumps(report.as_json(), sort_keys=True, default=str), flush=True)
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
