"""Dagster shells for publishing: `published_lists`, `fallback_lists`, and `rollback_job`.

Each asset calls one plain function (publisher.py) and reports what it did. The validation
gate is a blocking asset check: on a refused version the check fails with its reasons and
the step raises, so the run is marked failed while the previous version keeps serving.
"""

from collections.abc import Iterator

import dagster as dg

from recsys_assets.pipeline.partitions import (
    ONE_RUN_PER_PARTITION,
    SurfaceRegion,
    surface_region_partitions,
)
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.manifest import rollback
from recsys_assets.publish.publisher import (
    PublishOutcome,
    publish_fallback_partition,
    publish_partition,
)

PUBLISH_GROUP = "publish"
PUBLISH_CHECK = "publish_validation"
FALLBACK_CHECK = "fallback_validation"
DIAGNOSIS_KEY = "short_lists_by_history"
"""Metadata key of a refusal's short-list diagnosis (a Markdown table by history segment)."""
PARTITIONS = surface_region_partitions()


def _gate(asset: str, name: str, what: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name=name,
        asset=asset,
        blocking=True,
        description=f"The new version of {what} passed the publish validation gate "
        "(thresholds: publish.thresholds in surfaces.yaml); if not, the manifest was not flipped.",
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PUBLISH_GROUP,
    deps=[dg.AssetKey("slates"), dg.AssetKey("subjects")],
    check_specs=[_gate("published_lists", PUBLISH_CHECK, "the partition's lists")],
    kinds={"parquet"},
)
def published_lists(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Writes the slates as a new immutable version, validates it, and flips the manifest."""
    partition = SurfaceRegion.from_context(context)
    outcome = publish_partition(
        recsys.warehouse(),
        recsys.settings(),
        partition.surface,
        partition.region,
        now=recsys.now(),
        pipeline_run_id=context.run.run_id,
    )
    yield from _report(context, outcome, PUBLISH_CHECK)


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PUBLISH_GROUP,
    check_specs=[_gate("fallback_lists", FALLBACK_CHECK, "the partition's fallback lists")],
    kinds={"parquet"},
)
def fallback_lists(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Non-personalized lists (popular, trending, editorial, new-user, tenant queues),
    aggregates only, published through the same versioned manifest."""
    partition = SurfaceRegion.from_context(context)
    outcome = publish_fallback_partition(
        recsys.warehouse(),
        recsys.settings(),
        partition.surface,
        partition.region,
        now=recsys.now(),
        pipeline_run_id=context.run.run_id,
    )
    yield from _report(context, outcome, FALLBACK_CHECK)


def _report(
    context: dg.AssetExecutionContext, outcome: PublishOutcome, check_name: str
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The check verdict and metadata; a refused version fails the step after reporting."""
    report = outcome.report
    metrics = report.metrics
    metadata: dict[str, dg.RawMetadataValue] = {
        "version": outcome.version,
        "version_path": outcome.path,
        "published": outcome.published,
        "active_version": outcome.manifest.active_version if outcome.manifest else "none",
        "lists": int(metrics.get("lists", 0)),
        "rows": int(metrics.get("rows", 0)),
        "invalid_item_rate": float(metrics.get("invalid_item_rate", 0.0)),
        "duplicate_rate": float(metrics.get("duplicate_rate", 0.0)),
        "empty_list_rate": float(metrics.get("empty_list_rate", 0.0)),
        "validation": dg.MetadataValue.md(report.to_markdown()),
        "garbage_collected": dg.MetadataValue.json(outcome.collected),
    }
    if "coverage" in metrics:
        metadata["coverage"] = float(metrics["coverage"])
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
