"""`recsys plan`: measured per-shard throughput turned into shards, hours and bytes.

The arithmetic (`plan_capacity`) is a pure function of the request and one measurement;
`load_throughput` reads the measurement that `benchmarks/bench_shards.py` writes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.shards import stage_path
from recsys_assets.warehouse import Warehouse

HEAVY_STEPS = ("candidate_pools", "features_asof", "scored_candidates", "slates")
"""The steps each shard runs (one Dagster step each)."""
STORED_STAGES = ("subjects", *HEAVY_STEPS)
"""The pipeline tables a partition's run writes to the warehouse."""
BENCHMARK_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "output" / "shards.json"
BENCHMARK_COMMAND = "python benchmarks/bench_shards.py"

Device = Literal["cpu", "gpu"]


class PlanError(ValueError):
    """The plan cannot be made: the message says what is missing and how to produce it."""


@dataclass(frozen=True)
class Throughput:
    """One measurement of a shard's heavy steps (one process: one core, or one GPU):
    `per_shard_rows_per_s` is a shard's candidate rows over the seconds of its four steps."""

    device: Device
    per_shard_rows_per_s: float
    step_startup_s: float
    """Start-up of one step process, paid once per step on top of its rows."""
    bytes_per_candidate_row: float | None
    measured_at: str
    source: str
    cores_per_step: int = 1
    """Cores a step used while measured (torch threads, `per_shard_threads`): a CPU step
    occupies that many of the `--cores`, and core-hours count them all."""


@dataclass(frozen=True)
class PlanRequest:
    users: int
    candidates: int
    surfaces: int
    regions: int
    shard_subjects: int
    parallelism: int
    """Shard steps running at once: cores (`--cores`) or GPUs (`--gpus`)."""
    window: timedelta


@dataclass(frozen=True)
class CapacityPlan:
    request: PlanRequest
    throughput: Throughput
    partitions: int
    subjects_per_partition: int
    shards_per_partition: int
    shards: int
    shard_steps: int
    candidate_rows: int
    device_hours: float
    """Core-hours (cpu) or GPU-hours (gpu) of shard steps for one full run."""
    waves: int
    """Rounds of `parallelism` shards the full run takes."""
    wall_seconds: float
    storage_bytes: float | None
    refresh_share: float
    """Share of the subjects one window can refresh at this parallelism (1.0 = all)."""


def plan_capacity(request: PlanRequest, throughput: Throughput) -> CapacityPlan:
    """Shards, device-hours, wall time, bytes and the refresh share of one full run.

    Users split evenly over regions; every surface covers every user of its region; a
    partition's subjects split into shards of `shard_subjects`; each shard runs the four
    heavy steps in sequence on one device at the measured rate, plus a step start-up each.
    """
    for name in ("users", "candidates", "surfaces", "regions", "shard_subjects", "parallelism"):
        if getattr(request, name) < 1:
            raise PlanError(f"{name} must be at least 1 (got {getattr(request, name)})")
    if request.window <= timedelta(0):
        raise PlanError(f"the window must be positive (got {request.window})")
    if request.regions > request.users:
        raise PlanError(
            f"{request.regions:,} regions for {request.users:,} users: every region needs a user"
        )
    partitions = request.surfaces * request.regions
    subjects_per_partition = math.ceil(request.users / request.regions)
    shards_per_partition = math.ceil(subjects_per_partition / request.shard_subjects)
    shards = partitions * shards_per_partition
    candidate_rows = request.users * request.surfaces * request.candidates
    rows_per_shard = request.shard_subjects * request.candidates
    shard_seconds = (
        rows_per_shard / throughput.per_shard_rows_per_s
        + len(HEAVY_STEPS) * throughput.step_startup_s
    )
    per_step = throughput.cores_per_step if throughput.device == "cpu" else 1
    if request.parallelism < per_step:
        raise PlanError(
            f"--cores {request.parallelism} is fewer than the {per_step} cores one shard step "
            f"was measured on ({throughput.source}): give at least {per_step}, or measure with "
            "fewer threads per step"
        )
    device_seconds = per_step * (
        candidate_rows / throughput.per_shard_rows_per_s
        + shards * len(HEAVY_STEPS) * throughput.step_startup_s
    )
    waves = math.ceil(shards / (request.parallelism // per_step))
    wall_seconds = waves * shard_seconds
    storage = (
        None
        if throughput.bytes_per_candidate_row is None
        else candidate_rows * throughput.bytes_per_candidate_row
    )
    return CapacityPlan(
        request=request,
        throughput=throughput,
        partitions=partitions,
        subjects_per_partition=subjects_per_partition,
        shards_per_partition=shards_per_partition,
        shards=shards,
        shard_steps=shards * len(HEAVY_STEPS),
        candidate_rows=candidate_rows,
        device_hours=device_seconds / 3600,
        waves=waves,
        wall_seconds=wall_seconds,
        storage_bytes=storage,
        refresh_share=min(1.0, request.window.total_seconds() / wall_seconds),
    )


def format_plan(plan: CapacityPlan) -> str:
    """The plan as the terminal shows it, one quantity per line."""
    request, measured = plan.request, plan.throughput
    unit = "core" if measured.device == "cpu" else "GPU"
    window_h = request.window.total_seconds() / 3600
    if plan.refresh_share >= 1.0:
        window_line = (
            f"a full refresh fits a {window_h:g} h window "
            f"({plan.wall_seconds / request.window.total_seconds():.0%} of it)"
        )
    else:
        window_line = (
            f"a {window_h:g} h window refreshes {plan.refresh_share:.1%} of the subjects: "
            "refresh that share incrementally (active users, expired lists) each window"
        )
    storage_line = (
        f"{_bytes(plan.storage_bytes)} per full run "
        f"({measured.bytes_per_candidate_row:.1f} B per candidate row)"
        if plan.storage_bytes is not None and measured.bytes_per_candidate_row is not None
        else "not measured: the benchmark file has no bytes_per_candidate_row; pass --bytes-per-row"
    )
    rows = [
        (
            "workload",
            f"{request.users:,} users × {request.candidates:,} candidates × "
            f"{request.surfaces} surfaces × {request.regions} regions",
        ),
        (
            "throughput",
            f"{measured.per_shard_rows_per_s:,.0f} candidate rows/s per shard, its steps "
            f"one after another on {_count(measured.cores_per_step if unit == 'core' else 1, unit)} "
            f"({measured.device}, {measured.source}, measured {measured.measured_at})",
        ),
        ("partitions", f"{plan.partitions:,}, {plan.subjects_per_partition:,} subjects each"),
        (
            "shards",
            f"{plan.shards:,} ({plan.shards_per_partition:,} per partition of "
            f"{request.shard_subjects:,} subjects)",
        ),
        ("shard steps", f"{plan.shard_steps:,} ({', '.join(HEAVY_STEPS)} per shard)"),
        ("candidate rows", f"{plan.candidate_rows:,} per full run"),
        (f"{unit}-hours", f"{plan.device_hours:,.1f}"),
        (
            "wall time",
            f"{_duration(plan.wall_seconds)} at {_count(request.parallelism, unit)} "
            f"({plan.waves:,} waves of shards)",
        ),
        ("storage", storage_line),
        ("daily window", window_line),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def load_throughput(
    device: Device, path: Path = BENCHMARK_FILE, bytes_per_row: float | None = None
) -> Throughput:
    """The `device` measurement in the benchmark file: the top-level entry (`"device": "cpu"`)
    or its `"gpu"` entry. `bytes_per_row` stands in for a missing `bytes_per_candidate_row`."""
    if not path.exists():
        raise PlanError(
            f"no throughput measurement at {path}: run `{BENCHMARK_COMMAND}` first "
            "(it writes the per-shard rows/s the plan uses)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PlanError(f"{path} is not JSON ({error}): rerun `{BENCHMARK_COMMAND}`") from None
    entries = [data, data.get("gpu")] if isinstance(data, dict) else []
    for entry in entries:
        if isinstance(entry, dict) and _device_of(entry) == device:
            return _throughput(entry, device, path, bytes_per_row)
    hint = (
        f'run `{BENCHMARK_COMMAND}` on a machine with a GPU and put its entry under "gpu"'
        if device == "gpu"
        else f"rerun `{BENCHMARK_COMMAND}`"
    )
    raise PlanError(f"{path} has no {device} measurement: {hint}")


def measure_bytes_per_candidate_row(warehouse: Warehouse, partition: SurfaceRegion) -> float:
    """Bytes of the pipeline tables the partition's last run left in `warehouse` (subjects
    to slates, every shard's parts) per candidate row of its candidate pools."""
    candidates = stage_path("candidate_pools", partition.path)
    if not warehouse.parquet_parts(candidates):
        raise PlanError(
            f"no candidate pools for {partition.surface}/{partition.region} in "
            f"{warehouse.uri(candidates)}: --bytes-from measures the warehouse a run left "
            f"in $RECSYS_WAREHOUSE_URL (`{BENCHMARK_COMMAND}` leaves one in "
            "benchmarks/output/bench_shards/<scale>/warehouse; `recsys run --surface "
            f"{partition.surface} --region {partition.region}` fills the current one), or "
            "pass --bytes-per-row"
        )
    rows = warehouse.dataset(candidates).count_rows()
    written = sum(
        int(warehouse.fs.du(warehouse.path(stage_path(stage, partition.path)), total=True))
        for stage in STORED_STAGES
        if warehouse.exists(stage_path(stage, partition.path))
    )
    return written / rows


def _device_of(entry: dict[str, Any]) -> Device | None:
    device = str(entry.get("device", ""))
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda") or device == "gpu":
        return "gpu"
    return None


def _throughput(
    entry: dict[str, Any], device: Device, path: Path, bytes_per_row: float | None
) -> Throughput:
    rate = entry.get("per_shard_rows_per_s")
    if (
        not isinstance(rate, int | float)
        or isinstance(rate, bool)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise PlanError(
            f"{path}: per_shard_rows_per_s of the {device} entry must be a positive number "
            f"(got {rate!r}); rerun `{BENCHMARK_COMMAND}`"
        )
    measured_bytes = entry.get("bytes_per_candidate_row")
    return Throughput(
        device=device,
        per_shard_rows_per_s=float(rate),
        step_startup_s=_non_negative(entry, "step_startup_s", device, path, default=0.0),
        bytes_per_candidate_row=bytes_per_row
        if bytes_per_row is not None
        else (
            _non_negative(entry, "bytes_per_candidate_row", device, path)
            if measured_bytes is not None
            else None
        ),
        measured_at=str(entry.get("measured_at", "at an unknown time")),
        source=path.name,
        cores_per_step=_threads(entry, path),
    )


def _non_negative(
    entry: dict[str, Any], field: str, device: Device, path: Path, default: float = 0.0
) -> float:
    """A measured quantity that is a finite number >= 0 (missing: `default`)."""
    value = entry.get(field, default)
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise PlanError(
            f"{path}: {field} of the {device} entry must be a finite number >= 0 "
            f"(got {value!r}); rerun `{BENCHMARK_COMMAND}`"
        )
    return float(value)


def _threads(entry: dict[str, Any], path: Path) -> int:
    threads = entry.get("per_shard_threads", 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise PlanError(
            f"{path}: per_shard_threads must be a whole number of threads (got {threads!r}); "
            f"rerun `{BENCHMARK_COMMAND}`"
        )
    return threads


def _count(number: int, unit: str) -> str:
    return f"one {unit}" if number == 1 else f"{number:,} {unit}s"


def _bytes(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    if not math.isfinite(count):
        return "more than can be counted"
    exponent = min(len(units) - 1, int(math.log(count, 1024))) if count >= 1 else 0
    return f"{count / 1024**exponent:,.1f} {units[exponent]}"


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.1f} h" if hours >= 1 else f"{seconds / 60:,.1f} min"
