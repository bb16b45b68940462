"""Dagster shells for publishing: `published_lists`, `fallback_lists`, and `rollback_job`.

Each asset calls one plain function (publisher.py) and reports what it did. The validation
gate is a blocking asset check: on a refused version the check fails with its reasons and
the step raises, so the run is marked failed while the previous version keeps serving.
"""

from collections.abc import Iterator

import dagster as dg

from recsys_assets.config import ConfigError
from recsys_assets.data.assets import raw_tables
from recsys_assets.pipeline.metadata import LOCATION, ROW_COUNT, ScoreHistogram, location
from recsys_assets.pipeline.partitions import (
    ONE_RUN_PER_PARTITION,
    SurfaceRegion,
    surface_region_partitions,
)
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.lists import CALIBRATED_COLUMN
from recsys_assets.publish.manifest import rollback
from recsys_assets.publish.publisher import (
    PublishOutcome,
    publish_fallback_partition,
    publish_partition,
)
from recsys_assets.publish.versions import LISTS_FILE
from recsys_assets.warehouse import Warehouse

PUBLISH_GROUP = "publish"
PUBLISH_CHECK = "publish_validation"
FALLBACK_CHECK = "fallback_validation"
DIAGNOSIS_KEY = "short_lists_by_history"
"""Metadata key of a refusal's short-list diagnosis (a Markdown table by history segment)."""
PARTITIONS = surface_region_partitions()


def _gate(asset: str, name: str, what: str) -> dg.AssetCheckSpec:
    """Partitioned like its asset, so each verdict is recorded against its partition."""
    return dg.AssetCheckSpec(
        name=name,
        asset=asset,
        blocking=True,
        description=f"The new version of {what} passed the publish validation gate "
        "(thresholds: publish.thresholds in surfaces.yaml); if not, the manifest was not flipped.",
        partitions_def=PARTITIONS,
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PUBLISH_GROUP,
    deps=[
        dg.AssetKey("slates"),
        dg.AssetKey("subjects"),
        # Validation judges the lists against current item state and person rules.
        *raw_tables("items", "interactions", "users", "user_controls"),
    ],
    check_specs=[_gate("published_lists", PUBLISH_CHECK, "the partition's lists")],
    kinds={"parquet"},
)
def published_lists(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Writes the slates as a new immutable version, validates it, and flips the manifest."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    outcome = publish_partition(
        warehouse,
        recsys.settings(),
        partition.surface,
        partition.region,
        now=recsys.now(),
        pipeline_run_id=context.run.run_id,
    )
    yield from _report(context, warehouse, outcome, PUBLISH_CHECK)


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PUBLISH_GROUP,
    deps=raw_tables("items", "interactions", "users", "editorial"),
    check_specs=[_gate("fallback_lists", FALLBACK_CHECK, "the partition's fallback lists")],
    kinds={"parquet"},
)
def fallback_lists(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Non-personalized lists (popular, trending, editorial, new-user, tenant queues),
    aggregates only, published through the same versioned manifest."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    try:
        settings.check_enabled(partition.surface, partition.region)
    except ConfigError as error:
        # A switched-off pair gets no lists at all, fallback lists included.
        raise dg.Failure(description=str(error), allow_retries=False) from None
    outcome = publish_fallback_partition(
        warehouse,
        settings,
        partition.surface,
        partition.region,
        now=recsys.now(),
        pipeline_run_id=context.run.run_id,
    )
    yield from _report(context, warehouse, outcome, FALLBACK_CHECK)


def _report(
    context: dg.AssetExecutionContext,
    warehouse: Warehouse,
    outcome: PublishOutcome,
    check_name: str,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The check verdict and metadata; a refused version fails the step after reporting."""
    report = outcome.report
    metrics = report.metrics
    metadata: dict[str, dg.RawMetadataValue] = {
        "version": outcome.version,
        LOCATION: location(warehouse, outcome.path),
        "published": outcome.published,
        "active_version": outcome.manifest.active_version if outcome.manifest else "none",
        "lists": int(metrics.get("lists", 0)),
        ROW_COUNT: int(metrics.get("rows", 0)),
        "invalid_item_rate": float(metrics.get("invalid_item_rate", 0.0)),
        "duplicate_rate": float(metrics.get("duplicate_rate", 0.0)),
        "empty_list_rate": float(metrics.get("empty_list_rate", 0.0)),
        "validation": dg.MetadataValue.md(report.to_markdown()),
        "garbage_collected": dg.MetadataValue.text(", ".join(outcome.collected) or "none"),
    }
    if "coverage" in metrics:
        metadata["coverage"] = float(metrics["coverage"])
    if not outcome.fallback:  # fallback lists carry no calibrated prediction
        metadata["score_histogram"] = _score_histogram(warehouse, outcome.path)
    if outcome.manifest is not None:
        metadata["lineage"] = dg.MetadataValue.json(outcome.manifest.lineage)
    check_metadata: dict[str, dg.RawMetadataValue] = {
        "failures": dg.MetadataValue.md(
            "\n".join(f"- {failure}" for failure in report.failures) or "none"
        ),
        "validation": dg.MetadataValue.md(report.to_markdown()),
    }
    if report.diagnosis:
        metadata[DIAGNOSIS_KEY] = check_metadata[DIAGNOSIS_KEY] = dg.MetadataValue.md(
            report.diagnosis
        )
    check = dg.AssetCheckResult(
        check_name=check_name,
        passed=outcome.published,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=check_metadata,
    )
    if outcome.published:
        yield dg.MaterializeResult(metadata=metadata, check_results=[check])
        return
    yield check
    context.log.error(outcome.summary())
    raise dg.Failure(description=outcome.summary(), metadata=metadata)


def _score_histogram(warehouse: Warehouse, version_path: str) -> dg.MetadataValue:
    """Calibrated P(engage) of the version's list items, in the buckets scored_candidates uses
    (read back from the one column, so a refused version is described too)."""
    histogram = ScoreHistogram()
    lists = warehouse.read_parquet(f"{version_path}/{LISTS_FILE}", columns=[CALIBRATED_COLUMN])
    histogram.add(lists[CALIBRATED_COLUMN].to_numpy())
    return histogram.to_markdown("list items")


class RollbackConfig(dg.Config):
    """Which partition to roll back, and to what (empty: the newest previous version)."""

    surface: str
    region: str
    to_version: str = ""
    fallback: bool = False
    reason: str = "rollback_job"


@dg.op
def rollback_published_version(
    context: dg.OpExecutionContext, config: RollbackConfig, recsys: RecsysResource
) -> str:
    """Flips the manifest back; refused (op fails) when the target is expired or unsafe."""
    settings = recsys.settings()
    settings.surface(config.surface)
    settings.check_region(config.region)
    manifest = rollback(
        recsys.warehouse(),
        config.surface,
        config.region,
        to_version=config.to_version or None,
        reason=config.reason,
        now=recsys.now(),
        fallback=config.fallback,
    )
    context.log.info(
        f"surface={config.surface} region={config.region}: active version is now "
        f"{manifest.active_version}"
    )
    context.add_output_metadata({"active_version": manifest.active_version})
    return manifest.active_version


@dg.job(description="Roll a partition's published lists back to a previous version.")
def rollback_job() -> None:
    rollback_published_version()


PUBLISH_ASSETS = [published_lists, fallback_lists]
PUBLISH_JOBS = [rollback_job]
