"""`recsys run`: materialize the graph on a local Dagster instance, partition by partition."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from recsys_assets.config import Settings
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion

DEFAULT_DAGSTER_HOME = ".dagster_home"
QUIET_RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
"""Runs log warnings and errors to the terminal, not Dagster's ~50 DEBUG events per step:
`recsys run` prints one line per partition instead; the events stay in the instance (UI)."""
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
    """The chosen partitions (default: all), validated against the configuration."""
    chosen_surfaces = (
        [settings.surface(name).name for name in surfaces] if surfaces else list(settings.surfaces)
    )
    chosen_regions = (
        [settings.check_region(name) for name in regions] if regions else list(settings.regions)
    )
    return [
        SurfaceRegion(surface, region) for region in chosen_regions for surface in chosen_surfaces
    ]


def run_pipeline(
    definitions: dg.Definitions,
    instance: dg.DagsterInstance,
    partitions: Sequence[SurfaceRegion],
    *,
    train_model: bool,
    progress: Callable[[str], None],
) -> list[PartitionOutcome]:
    """Train the bundle (if asked), then refresh each partition in its own run."""
    if train_model:
        started = time.monotonic()
        progress("model_bundle: training …")
        result = definitions.resolve_job_def(MODEL_JOB).execute_in_process(
            instance=instance, raise_on_error=False, run_config=QUIET_RUN_CONFIG
        )
        if not result.success:
            raise RuntimeError(f"model_bundle failed: {_first_error(result)}")
        metadata = _metadata(result)
        progress(
            f"model_bundle: {metadata.get('model_bundle', {}).get('model_version', '?')} "
            f"in {time.monotonic() - started:.1f}s"
        )
    job = definitions.resolve_job_def(REFRESH_JOB)
    outcomes = []
    for index, partition in enumerate(partitions, start=1):
        started = time.monotonic()
        result = job.execute_in_process(
            instance=instance,
            partition_key=partition.to_key(),
            raise_on_error=False,
            run_config=QUIET_RUN_CONFIG,
        )
        outcome = PartitionOutcome(
            partition=partition,
            success=result.success,
            seconds=time.monotonic() - started,
            metadata=_metadata(result),
            error="" if result.success else _first_error(result),
        )
        outcomes.append(outcome)
        progress(f"[{index}/{len(partitions)}] {_describe(outcome)}")
    return outcomes


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        found[materialization.asset_key.to_user_string()] = {
            key: getattr(value, "value", value) for key, value in materialization.metadata.items()
        }
    return found


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            error = event.step_failure_data.error
            return f"{event.step_key}: {error.message.strip() if error else 'failed'}"
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
