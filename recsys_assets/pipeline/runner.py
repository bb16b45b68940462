"""`recsys run`: materialize the graph on a local Dagster instance, partition by partition.

Partitions (surface × region) are independent once the model bundle is trained, so they may
run concurrently: `ParallelRuns` runs them in worker processes (each builds the code
location from the same `RecsysResource` and records its runs in the same instance), at most
`workers` at a time. The bundle is trained once, before any partition starts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from recsys_assets.config import Settings
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource

DEFAULT_DAGSTER_HOME = ".dagster_home"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
"""Runs log warnings and errors to the terminal, not Dagster's ~50 DEBUG events per step:
`recsys run` prints one line per partition instead; the events stay in the instance (UI)."""
VERBOSE_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}
"""`recsys --verbose run`: Dagster's whole event stream on the terminal."""
PROJECT_INSTANCE_CONFIG = Path(__file__).resolve().parents[2] / "dagster.yaml"


def local_instance() -> dg.DagsterInstance:
    """The instance under $DAGSTER_HOME, else ./.dagster_home (created with dagster.yaml)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / DEFAULT_DAGSTER_HOME).resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and PROJECT_INSTANCE_CONFIG.exists():
        shutil.copyfile(PROJECT_INSTANCE_CONFIG, config)
    os.environ["DAGSTER_HOME"] = str(home)
    quiet_migrations()
    return dg.DagsterInstance.get()


def quiet_migrations() -> None:
    """A new SQLite instance runs its schema migrations through alembic, which logs ~100
    INFO lines about them: keep its warnings only."""
    logging.getLogger("alembic").setLevel(logging.WARNING)


class TrainingFailed(RuntimeError):
    """The model bundle's run failed, so no partition was refreshed; the message is its
    first step error (what the asset raised)."""


@dataclass
class PartitionOutcome:
    partition: SurfaceRegion
    success: bool
    seconds: float
    metadata: dict[str, dict[str, object]] = field(default_factory=dict)
    """asset name → its materialization metadata (plain values)."""
    error: str = ""


def select_partitions(
    settings: Settings, surfaces: Sequence[str] | None, regions: Sequence[str] | None
) -> list[SurfaceRegion]:
    """The chosen partitions (default: all), validated against the configuration.

    Pairs a surface's `regions` leaves out are skipped; a choice that leaves nothing (e.g.
    `--surface enterprise_action_queue --region latam`) is a ConfigError naming the key.
    """
    chosen_surfaces = (
        [settings.surface(name).name for name in surfaces] if surfaces else list(settings.surfaces)
    )
    chosen_regions = (
        [settings.check_region(name) for name in regions] if regions else list(settings.regions)
    )
    chosen = [
        SurfaceRegion(surface, region)
        for region in chosen_regions
        for surface in chosen_surfaces
        if settings.is_enabled(surface, region)
    ]
    if not chosen:
        settings.check_enabled(chosen_surfaces[0], chosen_regions[0])
    return chosen


@dataclass(frozen=True)
class ParallelRuns:
    """Run partitions in `workers` processes, each building the code location from `recsys`
    (a Definitions object cannot cross a process boundary; its resource can)."""

    recsys: RecsysResource
    workers: int


def run_pipeline(
    definitions: dg.Definitions,
    instance: dg.DagsterInstance,
    partitions: Sequence[SurfaceRegion],
    *,
    train_model: bool,
    progress: Callable[[str], None],
    parallel: ParallelRuns | None = None,
    verbose: bool = False,
) -> list[PartitionOutcome]:
    """Train the bundle (if asked), then refresh each partition in its own run: one after
    another, or `parallel.workers` at a time (outcomes in partition order either way).
    `verbose` puts Dagster's event log on the terminal."""
    run_config = VERBOSE_RUN_CONFIG if verbose else QUIET_RUN_CONFIG
    if train_model:
        started = time.monotonic()
        progress("model_bundle: training …")
        result = definitions.resolve_job_def(MODEL_JOB).execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config
        )
        if not result.success:
            raise TrainingFailed(f"model_bundle failed: {_first_error(result)}")
        metadata = _metadata(result)
        progress(
            f"model_bundle: {metadata.get('model_bundle', {}).get('model_version', '?')} "
            f"in {time.monotonic() - started:.1f}s"
        )
    outcomes: dict[SurfaceRegion, PartitionOutcome] = {}

    def report(outcome: PartitionOutcome) -> None:
        outcomes[outcome.partition] = outcome
        progress(f"[{len(outcomes)}/{len(partitions)}] {_describe(outcome)}")

    if parallel is None or parallel.workers <= 1 or len(partitions) <= 1:
        for partition in partitions:
            report(run_partition(definitions, instance, partition, run_config))
    else:
        workers = min(parallel.workers, len(partitions))
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(workers,),
        ) as pool:
            # A resource does not pickle; its fields do.
            fields = {name: getattr(parallel.recsys, name) for name in RecsysResource.model_fields}
            futures = [
                pool.submit(_run_in_worker, fields, partition, run_config)
                for partition in partitions
            ]
            for future in as_completed(futures):
                report(future.result())
    return [outcomes[partition] for partition in partitions]


def run_partition(
    definitions: dg.Definitions,
    instance: dg.DagsterInstance,
    partition: SurfaceRegion,
    run_config: dict[str, Any],
) -> PartitionOutcome:
    """One partition's refresh run, its outcome and metadata."""
    started = time.monotonic()
    result = definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
        instance=instance,
        partition_key=partition.to_key(),
        raise_on_error=False,
        run_config=run_config,
    )
    return PartitionOutcome(
        partition=partition,
        success=result.success,
        seconds=time.monotonic() - started,
        metadata=_metadata(result),
        error="" if result.success else _first_error(result),
    )


def _start_worker(workers: int) -> None:
    """Share the cores between the workers (torch and DuckDB would each take all of them)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    quiet_migrations()


def _run_in_worker(
    recsys_fields: dict[str, str], partition: SurfaceRegion, run_config: dict[str, Any]
) -> PartitionOutcome:
    """A worker's partition run, on the instance under the parent's DAGSTER_HOME."""
    from recsys_assets.definitions import build_definitions

    with dg.DagsterInstance.get() as instance:
        return run_partition(
            build_definitions(RecsysResource(**recsys_fields)), instance, partition, run_config
        )


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        found[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    return found


def _root_cause(error: Any) -> str:
    """The innermost message of a step's error (Dagster's SerializableErrorInfo chain): Dagster
    wraps what the asset raised, the part that says what to do, in "Error occurred while
    executing op ..."."""
    while error.cause is not None:
        error = error.cause
    return error.message.strip()


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            return f"{event.step_key}: {_root_cause(error) if error else 'failed'}"
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if evaluation is not None and not evaluation.passed:  # type: ignore[union-attr]
                return f"check {evaluation.check_name} failed"  # type: ignore[union-attr]
    return "run failed"


def _describe(outcome: PartitionOutcome) -> str:
    label = f"{outcome.partition.surface} × {outcome.partition.region}"
    if not outcome.success:
        return f"{label}: FAILED after {outcome.seconds:.1f}s — {outcome.error}"
    subjects = outcome.metadata.get("subjects", {}).get("subjects", "?")
    lists = outcome.metadata.get("slates", {}).get("lists", "?")
    published = outcome.metadata.get("published_lists", {}).get("version")
    tail = f", published {published}" if published else ""
    return f"{label}: {subjects} subjects, {lists} lists{tail} ({outcome.seconds:.1f}s)"
