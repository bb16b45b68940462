"""`recsys plan`: the capacity plan for a deployment of a given size (docs/SCALE.md)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from datetime import timedelta
from pathlib import Path

from recsys_assets.config import load_settings, parse_duration
from recsys_assets.deployment.plan import (
    BENCHMARK_FILE,
    PlanRequest,
    format_plan,
    load_throughput,
    measure_bytes_per_candidate_row,
    plan_capacity,
)
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.warehouse import Warehouse

MAX_COUNT = 10**12
"""Largest count an argument takes: beyond it the arithmetic is no plan (and floats lose it)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="shards, core- or GPU-hours, wall time and storage for a deployment's size",
        description="Turn the measured per-shard throughput (benchmarks/output/shards.json, "
        "written by benchmarks/bench_shards.py) into the shard steps, core- or GPU-hours, "
        "wall time at the given parallelism, storage written and the share of subjects a "
        "refresh window covers, for one full run of every surface × region partition.",
    )
    plan.add_argument("--users", type=_positive_int, required=True, help="users in all regions")
    plan.add_argument(
        "--candidates", type=_positive_int, required=True, help="candidates scored per subject"
    )
    plan.add_argument(
        "--surfaces", type=_positive_int, help="surfaces (default: the configured ones)"
    )
    plan.add_argument(
        "--regions", type=_positive_int, help="regions (default: the configured ones)"
    )
    devices = plan.add_mutually_exclusive_group()
    devices.add_argument(
        "--cores",
        type=_positive_int,
        help="CPU cores running shard steps (default: this machine's)",
    )
    devices.add_argument(
        "--gpus", type=_positive_int, help="GPUs running shard steps (uses the GPU measurement)"
    )
    plan.add_argument("--window", type=_window, default="24h", help="refresh window (default 24h)")
    plan.add_argument(
        "--shard-subjects",
        type=_positive_int,
        help="subjects per shard (default: pipeline.shard_subjects of the configuration)",
    )
    storage = plan.add_mutually_exclusive_group()
    storage.add_argument(
        "--bytes-per-row",
        type=_positive_float,
        help="bytes written per candidate row (default: the benchmark's bytes_per_candidate_row)",
    )
    storage.add_argument(
        "--bytes-from",
        metavar="SURFACE/REGION",
        type=_partition,
        help="measure the bytes per candidate row from this partition's last run in the "
        "warehouse ($RECSYS_WAREHOUSE_URL)",
    )
    plan.add_argument(
        "--benchmark",
        type=Path,
        default=BENCHMARK_FILE,
        help="the throughput measurement (default benchmarks/output/shards.json)",
    )
    plan.set_defaults(handler=_plan)


def _plan(args: argparse.Namespace) -> int:
    settings = load_settings()
    # The measurement first: without it there is no plan, whatever else is asked.
    throughput = load_throughput("gpu" if args.gpus else "cpu", args.benchmark, args.bytes_per_row)
    if args.bytes_from is not None:
        settings.surface(args.bytes_from.surface)  # a ConfigError naming the known ones
        settings.check_region(args.bytes_from.region)
        throughput = dataclasses.replace(
            throughput,
            bytes_per_candidate_row=measure_bytes_per_candidate_row(
                Warehouse.from_env(), args.bytes_from
            ),
        )
    request = PlanRequest(
        users=args.users,
        candidates=args.candidates,
        surfaces=args.surfaces or len(settings.surfaces),
        regions=args.regions or len(settings.regions),
        shard_subjects=args.shard_subjects or settings.pipeline.shard_subjects,
        parallelism=args.gpus or args.cores or os.cpu_count() or 1,
        window=args.window,
    )
    print(format_plan(plan_capacity(request, throughput)))
    return 0


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {value!r})") from None
    if number < 1 or number > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_COUNT:,} (got {value})")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {value!r})") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (got {value})")
    return number


def _window(value: str) -> timedelta:
    try:
        window = parse_duration(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if window <= timedelta(0):
        raise argparse.ArgumentTypeError(f"must be a positive duration (got {value})")
    return window


def _partition(value: str) -> SurfaceRegion:
    surface, _, region = value.partition("/")
    if not surface or not region:
        raise argparse.ArgumentTypeError(
            f"expected SURFACE/REGION, e.g. home_feed/na (got {value})"
        )
    return SurfaceRegion(surface, region)
