"""The batch pipeline's assets: thin shells over the stage functions.

Every partitioned asset reads its upstream partition from the warehouse, processes it in
subject shards (one Parquet part per shard, so memory does not grow with users), checks
each part against the stage's Pandera contract, writes it, and reports metadata. The
contract checks are blocking: a violation stops the downstream steps of the run.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
from dagster_duckdb import DuckDBResource

from recsys_assets.config import ConfigError
from recsys_assets.contracts.pipeline import PIPELINE_CONTRACTS, validate_stage
from recsys_assets.data import read_raw
from recsys_assets.data.assets import raw_tables
from recsys_assets.data.snapshot import raw_table_path
from recsys_assets.models.bundle import load_bundle, train_bundle
from recsys_assets.pipeline import candidates as candidate_stage
from recsys_assets.pipeline.feature_tables import (
    PER_SUBJECT_TABLES,
    FeatureTables,
    feature_tables,
    gather_features,
)
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION
from recsys_assets.pipeline.metadata import (
    COLUMN_SCHEMA,
    LOCATION,
    ROW_COUNT,
    ScoreHistogram,
    column_schema,
    distribution,
    location,
)
from recsys_assets.pipeline.partitions import (
    ONE_RUN_PER_PARTITION,
    SurfaceRegion,
    surface_region_partitions,
)
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.retrieval import two_tower_retriever
from recsys_assets.pipeline.scoring import ITEM_COLUMNS as SCORING_ITEM_COLUMNS
from recsys_assets.pipeline.scoring import score_candidates
from recsys_assets.pipeline.shards import (
    RowSample,
    ShardWriteResult,
    UniformSample,
    markdown_table,
    part_name,
    raw_dataset,
    read_parts,
    stage_path,
    write_shards,
    write_table_shards,
)
from recsys_assets.pipeline.slates import build_slates
from recsys_assets.pipeline.subjects import select_subjects, shard_bounds
from recsys_assets.rules.person import read_events
from recsys_assets.rules.tombstones import load_tombstones, person_tombstones
from recsys_assets.warehouse import Warehouse

PARTITIONS = surface_region_partitions()
FEATURE_ITEM_COLUMNS = ["item_id", "category", "creator_id", "stock", "is_sponsored", "created_at"]
PIPELINE_GROUP = "pipeline"
FEATURE_SAMPLE_ROWS = 1_000
"""Full feature rows kept per partition (scored_candidates/…/feature_sample) for debugging:
scoring gathers features without writing them."""
UTILITY_SAMPLE_ROWS = 1_000_000
"""The utility quantiles in metadata come from a uniform sample of this many rows (exact below
it), so scored_candidates' memory does not grow with the partition."""


def _contract_check(asset: str) -> dg.AssetCheckSpec:
    """Partitioned like its asset, so each evaluation is recorded against its partition."""
    return dg.AssetCheckSpec(
        name=f"{asset}_contract",
        asset=asset,
        blocking=True,
        description=f"Every part of {asset} satisfies its Pandera contract "
        "(recsys_assets.contracts.pipeline).",
        partitions_def=PARTITIONS,
    )


def _schema(stage: str) -> dict[str, Any]:
    """Definition metadata: the stage's columns, from its contract."""
    return {COLUMN_SCHEMA: column_schema(PIPELINE_CONTRACTS[stage])}


def _outcome(
    asset: str,
    warehouse: Warehouse,
    partition: SurfaceRegion,
    result: ShardWriteResult,
    metadata: dict[str, Any],
) -> dg.MaterializeResult:
    """Metadata (row count, where the parts lie) plus the contract check's verdict."""
    passed = result.violation is None
    check = dg.AssetCheckResult(
        check_name=f"{asset}_contract",
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "violations": str(result.violation) if not passed else "none",
            "rows_checked": result.rows,
        },
    )
    return dg.MaterializeResult(
        metadata={
            **metadata,
            ROW_COUNT: result.rows,
            "parts": result.parts,
            LOCATION: location(warehouse, stage_path(asset, partition.path)),
        },
        check_results=[check],
    )


@dg.asset(
    group_name="models",
    deps=raw_tables("users", "items", "interactions", "exposures", "user_controls", "editorial"),
    kinds={"torch"},
)
def model_bundle(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
    """Two-tower retrieval + calibrated ranker, trained on data before the training cutoff.

    Writes a versioned bundle (weights + bundle.json) and points models/current.json at it.
    """
    info = train_bundle(recsys.warehouse(), recsys.settings())
    context.log.info("trained model bundle %s", info.model_version)
    metrics = {
        name: round(float(value), 4) for name, value in info.metrics.items() if value is not None
    }
    return dg.MaterializeResult(
        metadata={
            "model_version": info.model_version,
            "feature_set_version": info.feature_set_version,
            "training_window": dg.MetadataValue.json(info.training_window),
            "data_snapshot": info.data_snapshot,
            "device": info.device,
            "offline_metrics": dg.MetadataValue.md(markdown_table(metrics, ("metric", "value"))),
            **metrics,
        }
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PIPELINE_GROUP,
    deps=raw_tables("users"),
    check_specs=[_contract_check("subjects")],
    metadata=_schema("subjects"),
    kinds={"pandas", "parquet"},
)
def subjects(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
    """Who may receive this surface in this region: consent, subscriptions, activity, tenant."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    try:
        settings.check_enabled(partition.surface, partition.region)
    except ConfigError as error:
        # The partitions are the full grid; a switched-off pair launched from the UI stops
        # here, before anything downstream could publish an empty version.
        raise dg.Failure(description=str(error), allow_retries=False) from None
    surface = settings.surface(partition.surface)
    now = recsys.now()
    suppressed = person_tombstones(load_tombstones(warehouse), now=now).no_personalization
    selection = select_subjects(
        read_raw(warehouse, "users"),
        surface,
        region=partition.region,
        now=now,
        suppressed=suppressed,
        events=read_events(warehouse),
    )
    frame = selection.subjects
    size = settings.pipeline.shard_subjects
    shards = (frame.iloc[start:stop] for start, stop in shard_bounds(len(frame), size))
    result = write_shards(
        warehouse, "subjects", partition.path, shards, lambda part: validate_stage("subjects", part)
    )
    excluded = {reason: count for reason, count in selection.excluded.items() if count}
    return _outcome(
        "subjects",
        warehouse,
        partition,
        result,
        {
            "subjects": len(frame),
            "excluded_by_reason": dg.MetadataValue.md(
                markdown_table(excluded, ("reason", "users"))
            ),
            **{f"excluded_{reason}": count for reason, count in excluded.items()},
        },
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PIPELINE_GROUP,
    deps=[
        subjects,
        model_bundle,
        *raw_tables("items", "interactions", "user_controls", "editorial"),
    ],
    check_specs=[_contract_check("candidate_pools")],
    metadata=_schema("candidate_pools"),
    kinds={"pandas", "torch", "parquet"},
)
def candidate_pools(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> dg.MaterializeResult:
    """Multi-source candidates with provenance, deduplicated, within the surface's budget."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)
    now = recsys.now()
    bundle = load_bundle(warehouse)
    ingredients = candidate_stage.build_context(
        items=read_raw(warehouse, "items"),
        interactions=read_raw(warehouse, "interactions"),
        user_controls=read_raw(warehouse, "user_controls"),
        editorial=read_raw(warehouse, "editorial"),
        region=partition.region,
        surface=surface,
        score_time=now,
        trending_window_days=settings.pipeline.trending_window_days,
        trending_min_share=settings.pipeline.trending_min_share,
        recent_history_items=settings.pipeline.recent_history_items,
        collaborative=bundle.collaborative,
        tombstones=load_tombstones(warehouse),
        events=read_events(warehouse),
    )

    two_tower = two_tower_retriever(
        bundle.two_tower,
        item_chunk=settings.pipeline.retrieval_item_chunk,
    )
    per_subject: list[np.ndarray] = []
    source_counts: Counter[str] = Counter()

    def shards() -> Iterator[pd.DataFrame]:
        for _, subject_shard in read_parts(warehouse, "subjects", partition.path):
            pool = candidate_stage.generate_candidates(
                subject_shard,
                ingredients,
                surface,
                two_tower=two_tower,
                recent_items_per_user=settings.pipeline.recent_items_per_user,
            )
            counts = (
                pool.groupby("subject_id").size().reindex(subject_shard["subject_id"], fill_value=0)
            )
            per_subject.append(counts.to_numpy())
            for column in candidate_stage.RANK_COLUMNS:
                source_counts[column.removeprefix("rank_")] += int((pool[column] > 0).sum())
            yield pool

    result = write_shards(
        warehouse,
        "candidate_pools",
        partition.path,
        shards(),
        lambda part: validate_stage("candidate_pools", part),
    )
    sizes = np.concatenate(per_subject) if per_subject else np.array([])
    total = max(sum(source_counts.values()), 1)
    shares = {source: count / total for source, count in source_counts.items()}
    source_mix = {source: f"{share:.1%}" for source, share in shares.items()}
    return _outcome(
        "candidate_pools",
        warehouse,
        partition,
        result,
        {
            "model_version": bundle.info.model_version,
            "candidate_policy_version": candidate_stage.CANDIDATE_POLICY_VERSION,
            **distribution("candidates_per_subject", sizes),
            "subjects_without_candidates": int((sizes == 0).sum()),
            **{f"candidate_share_{source}": round(share, 4) for source, share in shares.items()},
            "source_mix": dg.MetadataValue.md(markdown_table(source_mix, ("source", "share"))),
        },
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PIPELINE_GROUP,
    deps=[candidate_pools, *raw_tables("items", "interactions", "exposures", "user_controls")],
    check_specs=[
        _contract_check("features_asof"),
        dg.AssetCheckSpec(
            name="no_future_feature_values",
            asset="features_asof",
            blocking=True,
            description="No feature table row uses a value from after the score_time.",
            partitions_def=PARTITIONS,
        ),
    ],
    kinds={"duckdb", "parquet"},
)
def features_asof(
    context: dg.AssetExecutionContext, recsys: RecsysResource, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Features as of the partition's score_time where they live: subject, item,
    subject × category / creator and exposure tables (pipeline/feature_tables.py)."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    now = recsys.now()
    sources = {
        # Event tables stay lazy datasets: each shard's SQL scans only its rows and columns.
        "interactions": raw_dataset(warehouse, "interactions"),
        "exposures": raw_dataset(warehouse, "exposures"),
        "user_controls": raw_dataset(warehouse, "user_controls"),
        "items": warehouse.read_arrow(raw_table_path("items"), columns=FEATURE_ITEM_COLUMNS),
        "surface": partition.surface,
        "score_time": now,
    }
    leaks = 0

    def checked(table: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
        def validate(part: pd.DataFrame) -> pd.DataFrame:
            nonlocal leaks
            leaks += int((part["feature_timestamp"] >= part["score_time"]).sum())
            return validate_stage(f"features_asof.{table}", part)

        return validate

    def per_subject_shards(con: Any) -> Iterator[dict[str, pd.DataFrame]]:
        for _, pool in read_parts(
            warehouse, "candidate_pools", partition.path, columns=["subject_id"]
        ):
            yield feature_tables(
                con, pool["subject_id"].unique(), tables=PER_SUBJECT_TABLES, **sources
            ).tables

    with duckdb.get_connection() as con:
        item_table = feature_tables(con, np.array([], dtype=np.int64), tables=("items",), **sources)
        results = {
            "items": write_shards(
                warehouse,
                "features_asof",
                f"{partition.path}/items",
                [item_table["items"]],
                checked("items"),
            )
        }
        if results["items"].violation is None:
            results.update(
                write_table_shards(
                    warehouse,
                    "features_asof",
                    partition.path,
                    per_subject_shards(con),
                    {table: checked(table) for table in PER_SUBJECT_TABLES},
                )
            )
    for stale in warehouse.list(stage_path("features_asof", partition.path), suffix=".parquet"):
        warehouse.delete(stale)  # row-per-candidate parts of an older version
    violations = [str(result.violation) for result in results.values() if result.violation]
    contract = dg.AssetCheckResult(
        check_name="features_asof_contract",
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "violations": "\n".join(violations) or "none",
            "rows_checked": sum(result.rows for result in results.values()),
        },
    )
    leakage = dg.AssetCheckResult(
        check_name="no_future_feature_values",
        passed=leaks == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows_with_future_values": leaks},
    )
    return dg.MaterializeResult(
        metadata={
            "feature_set_version": FEATURE_SET_VERSION,
            "score_time": str(now),
            ROW_COUNT: sum(result.rows for result in results.values()),
            **{f"{table}_rows": result.rows for table, result in results.items()},
            "parts": max(result.parts for result in results.values()),
            LOCATION: location(warehouse, stage_path("features_asof", partition.path)),
        },
        check_results=[contract, leakage],
    )


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PIPELINE_GROUP,
    deps=[features_asof, model_bundle, *raw_tables("items", "interactions")],
    check_specs=[_contract_check("scored_candidates")],
    metadata=_schema("scored_candidates"),
    kinds={"torch", "parquet"},
)
def scored_candidates(
    context: dg.AssetExecutionContext, recsys: RecsysResource
) -> dg.MaterializeResult:
    """Gather each pool row's features from features_asof and score them in one pass:
    calibrated ranker predictions and utility with its components, with lineage."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    bundle = load_bundle(warehouse)
    items = read_raw(warehouse, "items", columns=["item_id", *SCORING_ITEM_COLUMNS]).set_index(
        "item_id"
    )
    popularity = _popularity_percentile(raw_dataset(warehouse, "interactions"), items.index)
    item_features = _feature_part(warehouse, partition, "items", part_name(0))
    # The score_time features_asof was computed for (an empty catalog has no rows, and then
    # no candidates either).
    score_time = (
        pd.Timestamp(item_features["score_time"].iloc[0]) if len(item_features) else recsys.now()
    )
    lineage = {
        "model_version": bundle.info.model_version,
        "feature_set_version": bundle.info.feature_set_version,
        "pipeline_run_id": context.run.run_id,
    }
    utilities = UniformSample(UTILITY_SAMPLE_ROWS)
    histogram = ScoreHistogram()
    sample = RowSample(FEATURE_SAMPLE_ROWS)

    def shards() -> Iterator[pd.DataFrame]:
        for name, pool in read_parts(warehouse, "candidate_pools", partition.path):
            tables = FeatureTables(
                score_time=score_time,
                tables={
                    "items": item_features,
                    **{
                        table: _feature_part(warehouse, partition, table, name)
                        for table in PER_SUBJECT_TABLES
                    },
                },
            )
            gathered = gather_features(tables, pool)
            prediction, calibrated = bundle.score_matrix(
                gathered.matrix,
                columns=tuple(FEATURE_COLUMNS),
                feature_set_version=FEATURE_SET_VERSION,
            )
            sample.add(
                len(pool),
                lambda rows, gathered=gathered, pool=pool: gathered.take(rows).frame(
                    pool.iloc[rows], score_time
                ),
            )
            scored = score_candidates(
                pool,
                prediction,
                calibrated,
                items,
                score_time=score_time,
                popularity_percentile=popularity,
                lineage=lineage,
            )
            utilities.add(scored["utility"].to_numpy())
            histogram.add(scored["calibrated"].to_numpy())
            yield scored

    result = write_shards(
        warehouse,
        "scored_candidates",
        partition.path,
        shards(),
        lambda part: validate_stage("scored_candidates", part),
    )
    metadata: dict[str, Any] = {
        **lineage,
        **distribution("utility", utilities.values, (0.05, 0.5, 0.95)),
        "utility_sample_rows": len(utilities.values),
        "score_histogram": histogram.to_markdown("candidates"),
    }
    sample_path = f"{stage_path('scored_candidates', partition.path)}/feature_sample"
    if result.violation is None and len(sample.rows()):
        warehouse.replace_folder(
            sample_path, {part_name(0): validate_stage("feature_rows", sample.rows())}
        )
        metadata["feature_sample"] = dg.MetadataValue.path(warehouse.uri(sample_path))
    else:
        warehouse.delete(sample_path, recursive=True)
    metadata["feature_sample_rows"] = len(sample.rows())
    return _outcome("scored_candidates", warehouse, partition, result, metadata)


def _feature_part(
    warehouse: Warehouse, partition: SurfaceRegion, table: str, part: str
) -> pd.DataFrame:
    """One part of a features_asof table; a clear error when features_asof is missing or
    older than the candidate pools it must match (one per-subject part per pool part)."""
    path = f"{stage_path('features_asof', partition.path)}/{table}/{part}"
    try:
        return warehouse.read_parquet(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"features_asof has no {table} part {part} for {partition.path} "
            f"({warehouse.uri(path)}): materialize features_asof for this partition after "
            "candidate_pools"
        ) from None


@dg.asset(
    partitions_def=PARTITIONS,
    backfill_policy=ONE_RUN_PER_PARTITION,
    group_name=PIPELINE_GROUP,
    deps=[scored_candidates],
    check_specs=[_contract_check("slates")],
    metadata=_schema("slates"),
    kinds={"pandas", "parquet"},
)
def slates(context: dg.AssetExecutionContext, recsys: RecsysResource) -> dg.MaterializeResult:
    """Slate policy: diversity caps, exploration slots (seed + propensity), sponsored cap."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)
    seed = settings.training.seed
    lengths: list[np.ndarray] = []
    explored = 0

    def shards() -> Iterator[pd.DataFrame]:
        nonlocal explored
        for _, scored in read_parts(warehouse, "scored_candidates", partition.path):
            slate = build_slates(scored, surface, seed=seed)
            subjects_in_shard = scored["subject_id"].unique()
            lengths.append(
                slate.groupby("subject_id")
                .size()
                .reindex(subjects_in_shard, fill_value=0)
                .to_numpy()
            )
            explored += int(slate["exploration"].sum())
            yield slate

    result = write_shards(
        warehouse, "slates", partition.path, shards(), lambda part: validate_stage("slates", part)
    )
    sizes = np.concatenate(lengths) if lengths else np.array([])
    subjects_total = sum(len(part) for _, part in read_parts(warehouse, "subjects", partition.path))
    return _outcome(
        "slates",
        warehouse,
        partition,
        result,
        {
            "slate_policy_version": surface.slate_policy.version,
            "exploration_seed": dg.MetadataValue.text(str(seed)),
            **distribution("items_per_list", sizes),
            "lists": len(sizes),
            "empty_lists": int(subjects_total - int((sizes > 0).sum())),
            "exploration_items": explored,
        },
    )


def _popularity_percentile(interactions: ds.Dataset, item_ids: pd.Index) -> pd.Series:
    """Percentile of each catalog item's interaction count (read from the item_id column
    alone), over the whole catalog: an item nobody touched ranks with the other untouched
    ones (their average rank), not as an unknown treated as the least popular of all."""
    counts = pc.value_counts(interactions.to_table(columns=["item_id"]).column("item_id"))
    per_item = pd.Series(
        counts.field("counts").to_numpy(),
        index=pd.Index(counts.field("values").to_numpy(), name="item_id"),
    )
    catalog = per_item.reindex(item_ids.union(per_item.index), fill_value=0)
    return catalog.sort_index().rank(pct=True)


PIPELINE_ASSETS = [
    model_bundle,
    subjects,
    candidate_pools,
    features_asof,
    scored_candidates,
    slates,
]
