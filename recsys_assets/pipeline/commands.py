"""`recsys run` and `recsys demo`."""

from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd

from recsys_assets.config import load_settings
from recsys_assets.data.snapshot import read_snapshot
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.runner import (
    ParallelRuns,
    PartitionOutcome,
    local_instance,
    run_pipeline,
    select_partitions,
)
from recsys_assets.publish.lists import DEV_TRACKING_SECRET, TRACKING_SECRET_ENV_VAR
from recsys_assets.warehouse import Warehouse


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="materialize the asset graph for chosen partitions on the local Dagster instance",
        description="Train the model bundle (unless --reuse-model and one exists), then "
        "materialize subjects → … → published lists for each chosen surface × region "
        "partition, one Dagster run per partition, on the instance under $DAGSTER_HOME "
        "(default ./.dagster_home). The warehouse is $RECSYS_WAREHOUSE_URL (default ./.warehouse).",
    )
    run.add_argument("--surface", action="append", help="surface to run (repeatable; default all)")
    run.add_argument("--region", action="append", help="region to run (repeatable; default all)")
    run.add_argument(
        "--reuse-model",
        action="store_true",
        help="use the current model bundle instead of retraining (trains if there is none)",
    )
    run.add_argument(
        "--score-time",
        type=_score_time,
        help="pin the pipeline clock (ISO 8601, UTC unless it names a zone) for a reproducible "
        "run or a re-run of a past one: the same data, bundle and time give the same lists "
        "(default: now)",
    )
    _workers_argument(run)
    run.set_defaults(handler=_run)

    demo = subparsers.add_parser(
        "demo",
        help="seed tiny synthetic data into the warehouse and run everything",
        description="Seed tiny synthetic data (deterministic), train the model bundle, "
        "materialize every partition, and print a short summary.",
    )
    demo.add_argument("--seed", type=int, default=1, help="synthetic data seed (default 1)")
    _workers_argument(demo)
    demo.set_defaults(handler=_demo)


def _workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=_positive,
        help="partitions to refresh at a time, each in its own process "
        "(default: pipeline.partition_workers of the configuration; 1 = one after another)",
    )


def _score_time(text: str) -> str:
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-11-20T06:00:00, got {text!r}"
        )
    return stamp.isoformat()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    load_settings()  # a bad configuration is named first, whatever else is missing
    warehouse = Warehouse.from_env()
    read_snapshot(warehouse)  # no raw data: say so in one line, before any run starts
    train = not (args.reuse_model and warehouse.exists("models/current.json"))
    outcomes = _execute(
        args.surface,
        args.region,
        train_model=train,
        workers=args.workers,
        verbose=args.verbose,
        score_time=args.score_time or "",
    )
    return _report(outcomes, started)


def _demo(args: argparse.Namespace) -> int:
    from recsys_assets.data.seed import seed_warehouse

    # A demo publishes email and push lists too; their tracking tokens need a secret, and
    # only the demo may use the development one (publishing refuses to run without one).
    os.environ.setdefault(TRACKING_SECRET_ENV_VAR, DEV_TRACKING_SECRET)
    warehouse = Warehouse.from_env()
    started = time.monotonic()
    report = seed_warehouse(warehouse, scale="tiny", seed=args.seed, settings=load_settings())
    _say(
        f"seeded tiny data into {warehouse.url} ({time.monotonic() - started:.1f}s): "
        + ", ".join(f"{table}={rows}" for table, rows in report.row_counts.items())
    )
    outcomes = _execute(None, None, train_model=True, workers=args.workers, verbose=args.verbose)
    return _report(outcomes, started)


def _execute(
    surfaces: list[str] | None,
    regions: list[str] | None,
    *,
    train_model: bool,
    workers: int | None,
    verbose: bool,
    score_time: str = "",
) -> list[PartitionOutcome]:
    from recsys_assets.definitions import build_definitions

    recsys = RecsysResource(score_time=score_time)
    settings = recsys.settings()
    partitions = select_partitions(settings, surfaces, regions)
    workers = min(workers or settings.pipeline.partition_workers, max(len(partitions), 1))
    instance = local_instance()
    _say(
        f"running {len(partitions)} partition(s), {workers} at a time, on the Dagster "
        f"instance in {instance.root_directory}"
    )
    return run_pipeline(
        build_definitions(recsys),
        instance,
        partitions,
        train_model=train_model,
        progress=_say,
        parallel=ParallelRuns(recsys, workers),
        verbose=verbose,
    )


def _report(outcomes: list[PartitionOutcome], started: float) -> int:
    """The summary line (wall time since `started`, seeding and training included)."""
    failed = [outcome for outcome in outcomes if not outcome.success]
    lists = sum(  # lists of partitions that published: a failed run published nothing
        int(outcome.metadata.get("slates", {}).get("lists", 0) or 0)
        for outcome in outcomes
        if outcome.success
    )
    _say(
        f"done: {len(outcomes) - len(failed)}/{len(outcomes)} partitions succeeded, "
        f"{lists} lists in {time.monotonic() - started:.1f}s (wall)"
    )
    for outcome in failed:
        _say(f"failed: {outcome.partition.surface} × {outcome.partition.region}: {outcome.error}")
    return 1 if failed else 0


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
