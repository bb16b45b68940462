"""The batch pipeline's assets: thin shells over the stage functions.

`subjects` splits a surface × region partition into subject shards (a stable hash of
subject_id, `pipeline.shards`). The heavy stages (candidate_pools, features_asof,
scored_candidates, slates) are graph-backed assets that run one step per shard: a fan-out
step yields the shards (DynamicOut), a shard step (retried on failure) reads its upstream
part, checks its output against the stage's Pandera contract and writes its own part, and
a merge step verifies that every shard's part is there and holds only that shard's
subjects, then reports the metadata and the contract checks. The contract checks are
blocking: a violation stops the downstream steps of the run. docs/AUTOMATION.md, "Shards".
"""

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from dagster_duckdb import DuckDBResource

from recsys_assets.config import ConfigError
from recsys_assets.contracts import ContractViolation
from recsys_assets.contracts.pipeline import PIPELINE_CONTRACTS, validate_stage
from recsys_assets.data import read_raw
from recsys_assets.data.assets import raw_table_key, raw_tables
from recsys_assets.data.snapshot import raw_table_path
from recsys_assets.models.bundle import (
    ModelBundle,
    ScoringPrecisionError,
    load_bundle,
    scoring_precision,
    train_bundle,
)
from recsys_assets.pipeline import candidates as candidate_stage
from recsys_assets.pipeline.candidate_sources import (
    BuiltSources,
    CandidateSourcesError,
    StoredSources,
    open_sources,
    remove_sources,
    sources_folder,
    write_sources,
)
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
    SHARDS_FOLDER,
    RowSample,
    ShardWriteResult,
    UniformSample,
    in_subject_blocks,
    markdown_table,
    merge_in_subject_order,
    part_name,
    raw_dataset,
    remove_parts_beyond,
    shard_part_path,
    shard_parts,
    stage_path,
    verify_shard_parts,
    write_shard_part,
)
from recsys_assets.pipeline.slates import OPTIONAL_LINEAGE_COLUMNS, SCORED_COLUMNS, build_slates
from recsys_assets.pipeline.subjects import (
    select_subjects,
    shard_bounds,
    shard_count,
    subject_shards,
)
from recsys_assets.rules.person import read_events
from recsys_assets.rules.tombstones import load_tombstones, person_tombstones
from recsys_assets.warehouse import Warehouse

PARTITIONS = surface_region_partitions()
FEATURE_ITEM_COLUMNS = ["item_id", "category", "creator_id", "stock", "is_sponsored", "created_at"]
PIPELINE_GROUP = "pipeline"
FEATURE_SAMPLE_ROWS = 1_000
"""Full feature rows kept per partition (scored_candidates/…/feature_sample) for debugging:
scoring gathers features without writing them."""
FEATURE_SAMPLE = "feature_sample"
UTILITY_SAMPLE_ROWS = 1_000_000
"""The utility quantiles in metadata come from a uniform sample of this many rows (exact below
it), so scored_candidates' memory does not grow with the partition."""
SCORING_BLOCK_ROWS = 4_096
"""Rows per ranker forward pass (see `score_in_blocks`)."""


def _raw(*tables: str) -> dict[str, dg.AssetKey]:
    """Graph inputs for source tables an asset reads: `raw_<table>` → its key."""
    return {f"raw_{table}": raw_table_key(table) for table in tables}


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
    """Who may receive this surface in this region: consent, subscriptions, activity, tenant.

    Also decides the partition's subject shards (`pipeline.shards`, a stable hash of
    subject_id): one part per shard, which every downstream stage follows, one step each.
    """
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
    shards = shard_count(len(frame), settings.pipeline.shards, settings.pipeline.shard_subjects)
    shard_of = subject_shards(frame["subject_id"].to_numpy(), shards)
    sizes: list[int] = []
    violation: ContractViolation | None = None
    for index in range(shards):
        shard = frame[shard_of == index].reset_index(drop=True)
        violation = write_shard_part(
            warehouse,
            shard_part_path("subjects", partition.path, index),
            shard,
            lambda part: validate_stage("subjects", part),
        )
        if violation is not None:
            warehouse.delete(stage_path("subjects", partition.path), recursive=True)
            break
        sizes.append(len(shard))
    remove_parts_beyond(warehouse, stage_path("subjects", partition.path), shards)
    excluded = {reason: count for reason, count in selection.excluded.items() if count}
    return _outcome(
        "subjects",
        warehouse,
        partition,
        ShardWriteResult(rows=sum(sizes), parts=shards, violation=violation),
        {
            "subjects": len(frame),
            "shards": shards,
            **distribution("subjects_per_shard", np.array(sizes)),
            "excluded_by_reason": dg.MetadataValue.md(
                markdown_table(excluded, ("reason", "users"))
            ),
            **{f"excluded_{reason}": count for reason, count in excluded.items()},
        },
    )


T = TypeVar("T")

SHARD_RETRY = dg.RetryPolicy(max_retries=2, delay=1.0, backoff=dg.Backoff.EXPONENTIAL)
"""Shard steps are retried: each rewrites its own fixed-name part atomically, so an attempt
that died half-way leaves nothing the retry could duplicate."""
SHARD_STEP_TAGS = {"recsys/step": "shard"}
"""Shard steps' tags: a deployment sizes their workers by them (deployment.k8s.step_resources)."""
SCORING_STEP_TAGS = {"recsys/step": "scoring"}
"""The scoring shard steps' tags: the one step a deployment may give a GPU
(deployment.k8s.step_resources.scoring), the other shard steps staying on CPUs."""
_RUN_INPUTS: dict[str, tuple[tuple[str, str], Any]] = {}
"""Per-partition inputs of a run's shard steps (name → ((run id, partition key), value))."""


def _run_inputs(context: dg.OpExecutionContext, name: str, build: Callable[[], T]) -> T:
    """What every shard step of this run and partition reads the same way (the candidate
    sources, the bundle, the item tables), built once per process: shard steps sharing a
    process (the in-process executor of `recsys run`) reuse it; a step in its own process
    (multiprocess, Celery, k8s) builds its own. One entry per name, so memory holds one
    partition's inputs; the merge step releases them (`_release_run_inputs`)."""
    key = (context.run.run_id, str(context.partition_key))
    cached = _RUN_INPUTS.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    _RUN_INPUTS.pop(name, None)  # the old partition's inputs go before the new ones are built
    value = build()
    _RUN_INPUTS[name] = (key, value)
    return value


def _release_run_inputs(name: str) -> None:
    _RUN_INPUTS.pop(name, None)


SHARD_FAULT_ENV_VAR = "RECSYS_SHARD_FAULT"
"""Fault drill: a file path; while the file exists and reads `<asset>/<shard>`, that shard
step fails once after writing its part (the file is removed), as a crash would."""


@dataclass(frozen=True)
class Shard:
    """One subject shard of a partition: the unit of work of a heavy stage's step."""

    index: int
    count: int


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard step wrote (rows per table, "" for the asset's own folder) and the small
    per-shard aggregates its merge step turns into metadata."""

    shard: int
    rows: dict[str, int]
    violation: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


FanOutHook = Callable[[dg.OpExecutionContext, RecsysResource, int], None]
"""What a fan-out step does once for all its shard steps: (context, recsys, shard count)."""


def _plan_op(
    asset: str,
    upstream: Sequence[str],
    folders: Sequence[str],
    prepare: FanOutHook | None = None,
) -> dg.OpDefinition:
    """The fan-out step of `asset`: one dynamic output per shard the subjects asset wrote.

    First it removes parts of `folders` (under the asset's partition folder) beyond this
    run's shard count, left by an earlier run with more shards; then `prepare` does what
    the run's shard steps need done once (candidate_pools: build the candidate sources).
    A step with a `prepare` carries the shard steps' tags: a deployment sizes it like them.
    """

    @dg.op(
        name=f"{asset}_shards",
        ins={name: dg.In(dg.Nothing) for name in upstream},
        out=dg.DynamicOut(Shard),
        description=f"One {asset} step per subject shard of the partition.",
        tags=SHARD_STEP_TAGS if prepare is not None else None,
    )
    def plan(
        context: dg.OpExecutionContext, recsys: RecsysResource
    ) -> Iterator[dg.DynamicOutput[Shard]]:
        partition = SurfaceRegion.from_context(context)
        warehouse = recsys.warehouse()
        count = shard_parts(warehouse, "subjects", partition.path)
        for folder in folders:
            remove_parts_beyond(
                warehouse, stage_path(asset, f"{partition.path}/{folder}".rstrip("/")), count
            )
        if prepare is not None:
            prepare(context, recsys, count)
        for index in range(count):
            yield dg.DynamicOutput(Shard(index, count), mapping_key=f"shard_{index:05d}")

    return plan


def _sharded_asset(
    asset: str,
    *,
    description: str,
    upstream: dict[str, dg.AssetKey],
    folders: Sequence[str],
    shard_op: dg.OpDefinition,
    merge_op: dg.OpDefinition,
    check_specs: Sequence[dg.AssetCheckSpec],
    kinds: set[str],
    metadata: dict[str, Any] | None = None,
    prepare: FanOutHook | None = None,
) -> dg.AssetsDefinition:
    """A graph-backed asset: fan out over the shards, one `shard_op` step each, collect,
    and `merge_op` verifies the parts and reports the asset's metadata and checks.
    `folders` are where the shard steps write their parts ("" for the partition's own);
    `prepare` runs once in the fan-out step (`_plan_op`)."""
    plan = _plan_op(asset, list(upstream), folders, prepare)
    check_outputs = [spec.get_python_identifier() for spec in check_specs]

    def compose(**ready: Any) -> dict[str, Any]:
        merged = merge_op(plan(**ready).map(shard_op).collect())
        return dict(zip(["result", *check_outputs], merged, strict=True))

    return dg.graph_asset(
        compose,
        name=asset,
        description=description,
        ins={name: dg.AssetIn(key=key, dagster_type=dg.Nothing) for name, key in upstream.items()},
        partitions_def=PARTITIONS,
        backfill_policy=ONE_RUN_PER_PARTITION,
        group_name=PIPELINE_GROUP,
        check_specs=check_specs,
        metadata=metadata,
        kinds=kinds,
    )


def _merge_outs(check_specs: Sequence[dg.AssetCheckSpec]) -> dict[str, dg.Out]:
    return {
        "result": dg.Out(dg.Nothing),
        **{spec.get_python_identifier(): dg.Out(dg.Nothing) for spec in check_specs},
    }


def _inject_fault(asset: str, shard: Shard) -> None:
    """The fault drill of SHARD_FAULT_ENV_VAR (after the part is written, as a crash)."""
    marker = os.environ.get(SHARD_FAULT_ENV_VAR)
    if not marker:
        return
    path = Path(marker)
    if path.is_file() and path.read_text().strip() == f"{asset}/{shard.index}":
        path.unlink()
        raise RuntimeError(f"fault drill: {asset} shard {shard.index} fails once")


def _sorted(outcomes: Sequence[ShardOutcome]) -> list[ShardOutcome]:
    """Shard order, whatever order the steps finished in."""
    return sorted(outcomes, key=lambda outcome: outcome.shard)


def _shard_subjects(warehouse: Warehouse, partition: SurfaceRegion, count: int) -> list[np.ndarray]:
    """Each shard's subject ids, as the subjects asset wrote them."""
    return [
        warehouse.read_parquet(
            shard_part_path("subjects", partition.path, index), columns=["subject_id"]
        )["subject_id"].to_numpy()
        for index in range(count)
    ]


def _verified(
    warehouse: Warehouse,
    folder: str,
    subjects_by_shard: Sequence[np.ndarray],
    outcomes: Sequence[ShardOutcome],
    table: str = "",
) -> None:
    """Fail the merge step when a shard's part is missing, extra, or holds subjects of
    another shard: the partition would lose or duplicate subjects."""
    problems = verify_shard_parts(
        warehouse, folder, subjects_by_shard, [outcome.rows[table] for outcome in outcomes]
    )
    if problems:
        raise dg.Failure(
            description=f"the shard parts of {warehouse.uri(folder)} do not add up: "
            + "; ".join(problems[:10]),
            allow_retries=False,
        )


def _merged(
    asset: str,
    warehouse: Warehouse,
    partition: SurfaceRegion,
    outcomes: Sequence[ShardOutcome],
    metadata: dict[str, Any],
) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    """The asset's materialization (rows, shards, where) and its contract check's verdict;
    a shard's contract violation removes the partition's folder (nothing half-written
    downstream)."""
    violations = [f"shard {o.shard}: {o.violation}" for o in outcomes if o.violation]
    folder = stage_path(asset, partition.path)
    if violations:
        warehouse.delete(folder, recursive=True)
    rows = sum(outcome.rows.get("", 0) for outcome in outcomes)
    yield dg.Output(
        None,
        "result",
        metadata={
            ROW_COUNT: rows,
            "parts": len(outcomes),
            "shards": len(outcomes),
            **distribution("rows_per_shard", np.array([o.rows.get("", 0) for o in outcomes])),
            LOCATION: location(warehouse, folder),
            **metadata,
        },
    )
    yield dg.AssetCheckResult(
        check_name=f"{asset}_contract",
        asset_key=asset,
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"violations": "\n".join(violations) or "none", "rows_checked": rows},
    )


# -- candidate_pools -------------------------------------------------------------------

CANDIDATE_SOURCES = "candidate_sources"
"""The `_run_inputs` entry of a partition's model bundle and candidate sources."""
TWO_TOWER_RETRIEVER = "two_tower_retriever"
"""The `_run_inputs` entry of the two_tower source's retriever (and its ivf / hnsw index)."""


def _run_lineage(context: dg.OpExecutionContext) -> list[str]:
    """This run's id, then those of the runs it re-executes (parent, grandparent, …)."""
    lineage = [context.run.run_id]
    parent = context.run.parent_run_id
    while parent is not None and parent not in lineage:
        lineage.append(parent)
        run = context.instance.get_run_by_id(parent)
        parent = run.parent_run_id if run is not None else None
    return lineage


def _build_candidate_sources(
    context: dg.OpExecutionContext, recsys: RecsysResource, shards: int
) -> None:
    """The candidate_pools fan-out's one-off work: build the partition's candidate sources
    and store them for shard steps in other processes (`pipeline/candidate_sources.py`);
    shard steps in this process take them from memory."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)

    def build() -> tuple[ModelBundle, BuiltSources]:
        started = time.perf_counter()
        bundle = load_bundle(warehouse)
        score_time = recsys.now()
        ingredients = candidate_stage.build_context(
            items=read_raw(warehouse, "items"),
            interactions=read_raw(warehouse, "interactions"),
            user_controls=read_raw(warehouse, "user_controls"),
            editorial=read_raw(warehouse, "editorial"),
            region=partition.region,
            surface=surface,
            score_time=score_time,
            trending_window_days=settings.pipeline.trending_window_days,
            trending_min_share=settings.pipeline.trending_min_share,
            recent_history_items=settings.pipeline.recent_history_items,
            collaborative=bundle.collaborative,
            tombstones=load_tombstones(warehouse),
            events=read_events(warehouse),
        )
        folder = sources_folder(partition.path)
        manifest = write_sources(
            warehouse,
            folder,
            ingredients,
            _shard_subjects(warehouse, partition, shards),
            run_id=context.run.run_id,
            score_time=score_time,
            model_version=bundle.info.model_version,
            build_seconds=time.perf_counter() - started,
        )
        context.log.info(
            f"built the candidate sources of {partition.path} for {shards} shard step(s) in "
            f"{manifest.build_seconds} s, stored them at {warehouse.uri(folder)} in "
            f"{manifest.write_seconds} s"
        )
        return bundle, BuiltSources(ingredients)

    _run_inputs(context, CANDIDATE_SOURCES, build)


@dg.op(retry_policy=SHARD_RETRY, tags=SHARD_STEP_TAGS)
def candidate_pools_shard(
    context: dg.OpExecutionContext, recsys: RecsysResource, shard: Shard
) -> ShardOutcome:
    """Candidates of one subject shard, from the candidate sources the fan-out step built:
    in memory when it ran in this process, else its shard's rows from the warehouse."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)
    folder = sources_folder(partition.path)

    def stored() -> tuple[ModelBundle, StoredSources]:
        bundle = load_bundle(warehouse)
        return bundle, open_sources(
            warehouse,
            folder,
            run_lineage=_run_lineage(context),
            model_version=bundle.info.model_version,
            shards=shard.count,
            collaborative=bundle.collaborative,
        )

    try:
        bundle, sources = _run_inputs(context, CANDIDATE_SOURCES, stored)
        ingredients = sources.for_shard(shard.index)
    except CandidateSourcesError as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    from_warehouse = isinstance(sources, StoredSources)
    if from_warehouse:
        context.log.info(
            f"read shard {shard.index}'s candidate sources from {warehouse.uri(folder)}"
        )
    two_tower = _run_inputs(  # one retriever per run: an ivf / hnsw index is built once
        context,
        TWO_TOWER_RETRIEVER,
        lambda: two_tower_retriever(
            bundle.two_tower,
            item_chunk=settings.pipeline.retrieval_item_chunk,
            retrieval=settings.pipeline.retrieval,
        ),
    )
    subject_shard = warehouse.read_parquet(shard_part_path("subjects", partition.path, shard.index))
    pool = in_subject_blocks(
        subject_shard,
        lambda subjects: candidate_stage.generate_candidates(
            subjects,
            ingredients,
            surface,
            two_tower=two_tower,
            recent_items_per_user=settings.pipeline.recent_items_per_user,
        ),
        block_threads(settings.pipeline.step_threads),
    )
    per_subject = (
        pool.groupby("subject_id").size().reindex(subject_shard["subject_id"], fill_value=0)
    )
    source_counts = {
        column.removeprefix("rank_"): int((pool[column] > 0).sum())
        for column in candidate_stage.RANK_COLUMNS
    }
    violation = write_shard_part(
        warehouse,
        shard_part_path("candidate_pools", partition.path, shard.index),
        pool,  # in (subject_id, item_id) order, as generate_candidates merges it
        lambda part: validate_stage("candidate_pools", part),
    )
    _inject_fault("candidate_pools", shard)
    return ShardOutcome(
        shard.index,
        {"": 0 if violation else len(pool)},
        str(violation) if violation else None,
        {
            "per_subject": per_subject.to_numpy(),
            "source_counts": source_counts,
            "model_version": bundle.info.model_version,
            "sources_from_warehouse": from_warehouse,
        },
    )


_CANDIDATE_CHECKS = [_contract_check("candidate_pools")]


@dg.op(out=_merge_outs(_CANDIDATE_CHECKS))
def candidate_pools_merge(
    context: dg.OpExecutionContext, recsys: RecsysResource, outcomes: list[ShardOutcome]
) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    """Every shard's candidate pools present and its own; metadata over the partition.
    The candidate sources go: every shard step of the run is done with them."""
    _release_run_inputs(CANDIDATE_SOURCES)
    _release_run_inputs(TWO_TOWER_RETRIEVER)
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    removed = remove_sources(warehouse, sources_folder(partition.path))
    sources: dict[str, Any] = {
        "candidate_sources_read_by_shard_steps": sum(
            outcome.stats["sources_from_warehouse"] for outcome in outcomes
        )
    }
    if removed is not None:
        manifest, size = removed
        sources |= {
            "candidate_sources_build_s": manifest.build_seconds,
            "candidate_sources_write_s": manifest.write_seconds,
            "candidate_sources_bytes": size,
        }
    outcomes = _sorted(outcomes)
    if not any(outcome.violation for outcome in outcomes):
        _verified(
            warehouse,
            stage_path("candidate_pools", partition.path),
            _shard_subjects(warehouse, partition, len(outcomes)),
            outcomes,
        )
    sizes = np.concatenate([outcome.stats["per_subject"] for outcome in outcomes])
    source_counts: Counter[str] = Counter()
    for outcome in outcomes:
        source_counts.update(outcome.stats["source_counts"])
    total = max(sum(source_counts.values()), 1)
    shares = {source: count / total for source, count in source_counts.items()}
    source_mix = {source: f"{share:.1%}" for source, share in shares.items()}
    yield from _merged(
        "candidate_pools",
        warehouse,
        partition,
        outcomes,
        {
            "model_version": outcomes[0].stats["model_version"],
            "candidate_policy_version": candidate_stage.CANDIDATE_POLICY_VERSION,
            **distribution("candidates_per_subject", sizes),
            "subjects_without_candidates": int((sizes == 0).sum()),
            **{f"candidate_share_{source}": round(share, 4) for source, share in shares.items()},
            "source_mix": dg.MetadataValue.md(markdown_table(source_mix, ("source", "share"))),
            **sources,
        },
    )


candidate_pools = _sharded_asset(
    "candidate_pools",
    description="Multi-source candidates with provenance, deduplicated, within the surface's "
    "budget; one step per subject shard.",
    upstream={
        "subjects": dg.AssetKey("subjects"),
        "model_bundle": dg.AssetKey("model_bundle"),
        **_raw("items", "interactions", "user_controls", "editorial"),
    },
    folders=[""],
    shard_op=candidate_pools_shard,
    merge_op=candidate_pools_merge,
    prepare=_build_candidate_sources,
    check_specs=_CANDIDATE_CHECKS,
    metadata=_schema("candidate_pools"),
    kinds={"pandas", "torch", "parquet"},
)


# -- features_asof ---------------------------------------------------------------------


def _feature_sources(
    warehouse: Warehouse, surface: str, score_time: pd.Timestamp
) -> dict[str, Any]:
    return {
        # Event tables stay lazy datasets: each shard's SQL scans only its rows and columns.
        "interactions": raw_dataset(warehouse, "interactions"),
        "exposures": raw_dataset(warehouse, "exposures"),
        "user_controls": raw_dataset(warehouse, "user_controls"),
        "items": warehouse.read_arrow(raw_table_path("items"), columns=FEATURE_ITEM_COLUMNS),
        "surface": surface,
        "score_time": score_time,
    }


def _future_rows(part: pd.DataFrame) -> int:
    return int((part["feature_timestamp"] >= part["score_time"]).sum())


@dg.op(retry_policy=SHARD_RETRY, tags=SHARD_STEP_TAGS)
def features_asof_shard(
    context: dg.OpExecutionContext,
    recsys: RecsysResource,
    duckdb: DuckDBResource,
    shard: Shard,
) -> ShardOutcome:
    """The per-subject feature tables of one shard's subjects with candidates."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    pool = warehouse.read_parquet(
        shard_part_path("candidate_pools", partition.path, shard.index), columns=["subject_id"]
    )
    sources = _feature_sources(warehouse, partition.surface, recsys.now())
    with duckdb.get_connection() as con:
        built = feature_tables(
            con, pool["subject_id"].unique(), tables=PER_SUBJECT_TABLES, **sources
        ).tables
    rows: dict[str, int] = {}
    leaks = 0
    for table in PER_SUBJECT_TABLES:
        part = built[table]
        leaks += _future_rows(part)
        violation = write_shard_part(
            warehouse,
            shard_part_path("features_asof", partition.path, shard.index, table),
            part,
            lambda frame, table=table: validate_stage(f"features_asof.{table}", frame),
        )
        if violation is not None:
            return ShardOutcome(shard.index, rows, str(violation), {"leaks": leaks})
        rows[table] = len(part)
    _inject_fault("features_asof", shard)
    return ShardOutcome(shard.index, {"": sum(rows.values()), **rows}, None, {"leaks": leaks})


_FEATURE_CHECKS = [
    _contract_check("features_asof"),
    dg.AssetCheckSpec(
        name="no_future_feature_values",
        asset="features_asof",
        blocking=True,
        description="No feature table row uses a value from after the score_time.",
        partitions_def=PARTITIONS,
    ),
]


@dg.op(out=_merge_outs(_FEATURE_CHECKS))
def features_asof_merge(
    context: dg.OpExecutionContext,
    recsys: RecsysResource,
    duckdb: DuckDBResource,
    outcomes: list[ShardOutcome],
) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    """The partition's item feature table, every shard's subject tables present and its
    own, and the contract and no-future-values verdicts over all of them."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    now = recsys.now()
    outcomes = _sorted(outcomes)
    with duckdb.get_connection() as con:
        items = feature_tables(
            con,
            np.array([], dtype=np.int64),
            tables=("items",),
            **_feature_sources(warehouse, partition.surface, now),
        )["items"]
    leaks = _future_rows(items) + sum(outcome.stats["leaks"] for outcome in outcomes)
    items_violation = write_shard_part(
        warehouse,
        shard_part_path("features_asof", partition.path, 0, "items"),
        items,
        lambda part: validate_stage("features_asof.items", part),
    )
    violations = [f"shard {o.shard}: {o.violation}" for o in outcomes if o.violation]
    if items_violation is not None:
        violations.append(f"items: {items_violation}")
    folder = stage_path("features_asof", partition.path)
    if violations:
        warehouse.delete(folder, recursive=True)
    else:
        subjects_by_shard = _shard_subjects(warehouse, partition, len(outcomes))
        for table in PER_SUBJECT_TABLES:
            _verified(warehouse, f"{folder}/{table}", subjects_by_shard, outcomes, table)
        for stale in warehouse.list(folder, suffix=".parquet"):
            warehouse.delete(stale)  # row-per-candidate parts of an older version
    rows = {
        "items": len(items),
        **{table: sum(o.rows.get(table, 0) for o in outcomes) for table in PER_SUBJECT_TABLES},
    }
    yield dg.Output(
        None,
        "result",
        metadata={
            "feature_set_version": FEATURE_SET_VERSION,
            "score_time": str(now),
            ROW_COUNT: sum(rows.values()),
            **{f"{table}_rows": count for table, count in rows.items()},
            "parts": len(outcomes),
            "shards": len(outcomes),
            LOCATION: location(warehouse, folder),
        },
    )
    yield dg.AssetCheckResult(
        check_name="features_asof_contract",
        asset_key="features_asof",
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "violations": "\n".join(violations) or "none",
            "rows_checked": sum(rows.values()),
        },
    )
    yield dg.AssetCheckResult(
        check_name="no_future_feature_values",
        asset_key="features_asof",
        passed=leaks == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"rows_with_future_values": leaks},
    )


features_asof = _sharded_asset(
    "features_asof",
    description="Features as of the partition's score_time where they live: subject, item, "
    "subject × category / creator and exposure tables (pipeline/feature_tables.py); the "
    "per-subject tables one step per subject shard.",
    upstream={
        "candidate_pools": dg.AssetKey("candidate_pools"),
        **_raw("items", "interactions", "exposures", "user_controls"),
    },
    folders=PER_SUBJECT_TABLES,
    shard_op=features_asof_shard,
    merge_op=features_asof_merge,
    check_specs=_FEATURE_CHECKS,
    kinds={"duckdb", "parquet"},
)


# -- scored_candidates -----------------------------------------------------------------


def score_in_blocks(
    bundle: ModelBundle,
    matrix: np.ndarray,
    block_rows: int = SCORING_BLOCK_ROWS,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """`bundle.score_matrix` in forward passes of exactly `block_rows` rows (the last one
    padded with zero rows), so every pass has the same shape and a row's score does not
    depend on which shard or batch it came in with (BLAS picks kernels by shape). On CUDA
    the blocks stream through pinned memory (`RankerModel.predict_matrix`)."""
    prediction, calibrated = bundle.score_matrix(
        matrix,
        columns=tuple(FEATURE_COLUMNS),
        feature_set_version=FEATURE_SET_VERSION,
        batch_size=block_rows,
        pad_last=True,
        precision=precision,
    )
    return prediction, calibrated.astype(np.float64)


def block_threads(configured: int | Literal["auto"]) -> int:
    """Threads a shard step spreads its subjects over (`pipeline.step_threads`): `auto` is
    torch's thread count, the CPU share this process has (`recsys run` sets it to the cores
    divided by the partitions it runs at once). Never more than the cores the process may
    run on: past them, threads only add hand-offs and each block's fixed costs (a ranker
    pass padded to SCORING_BLOCK_ROWS; on tiny data `step_threads: 100000` ran 3.3× slower
    in 1.9× the memory)."""
    wanted = torch.get_num_threads() if configured == "auto" else configured
    return max(1, min(wanted, usable_cores()))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dg.op(retry_policy=SHARD_RETRY, tags=SCORING_STEP_TAGS)
def scored_candidates_shard(
    context: dg.OpExecutionContext, recsys: RecsysResource, shard: Shard
) -> ShardOutcome:
    """Gather and score one shard's candidate rows."""
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()

    def inputs() -> tuple[ModelBundle, pd.DataFrame, pd.Series, pd.DataFrame]:
        items = read_raw(warehouse, "items", columns=["item_id", *SCORING_ITEM_COLUMNS]).set_index(
            "item_id"
        )
        return (
            load_bundle(warehouse),
            items,
            _popularity_percentile(raw_dataset(warehouse, "interactions"), items.index),
            _feature_part(warehouse, partition, "items", part_name(0)),
        )

    bundle, items, popularity, item_features = _run_inputs(context, "scoring_inputs", inputs)
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
    pool = warehouse.read_parquet(shard_part_path("candidate_pools", partition.path, shard.index))
    tables = FeatureTables(
        score_time=score_time,
        tables={
            "items": item_features,
            **{
                table: _feature_part(warehouse, partition, table, part_name(shard.index))
                for table in PER_SUBJECT_TABLES
            },
        },
    )
    try:
        precision = scoring_precision(recsys.settings().pipeline.scoring_precision, bundle)
    except ScoringPrecisionError as error:  # configuration, not a transient fault: no retry
        raise dg.Failure(str(error), allow_retries=False) from error

    def gather_and_score(block: pd.DataFrame) -> pd.DataFrame:
        gathered = gather_features(tables, block)
        prediction, calibrated = score_in_blocks(bundle, gathered.matrix, precision=precision)
        return score_candidates(
            block,
            prediction,
            calibrated,
            items,
            score_time=score_time,
            popularity_percentile=popularity,
            lineage=lineage,
        )

    # A GPU takes one stream of scoring blocks; on the CPU the gathers share the cores.
    on_cpu = bundle.ranker.device.type == "cpu"
    scored = in_subject_blocks(
        pool,
        gather_and_score,
        block_threads(recsys.settings().pipeline.step_threads) if on_cpu else 1,
    )
    context.add_output_metadata(
        {"scoring_device": str(bundle.ranker.device), "scoring_precision": precision}
    )
    sample = RowSample(math.ceil(FEATURE_SAMPLE_ROWS / shard.count), seed=shard.index)
    sample.add(  # the sampled rows gathered again: the same lookups, a few thousand rows
        len(pool),
        lambda rows: gather_features(tables, pool.iloc[rows]).frame(pool.iloc[rows], score_time),
    )
    utilities = UniformSample(math.ceil(UTILITY_SAMPLE_ROWS / shard.count), seed=shard.index)
    utilities.add(scored["utility"].to_numpy())
    histogram = ScoreHistogram()
    histogram.add(scored["calibrated"].to_numpy())
    violation = write_shard_part(
        warehouse,
        shard_part_path("scored_candidates", partition.path, shard.index),
        scored,
        lambda part: validate_stage("scored_candidates", part),
    )
    sample_path = f"{stage_path('scored_candidates', partition.path)}/{FEATURE_SAMPLE}"
    if violation is None and len(sample.rows()):
        warehouse.write_parquet(
            f"{sample_path}/{part_name(shard.index)}",
            validate_stage("feature_rows", sample.rows()),
        )
    else:
        warehouse.delete(f"{sample_path}/{part_name(shard.index)}")
    _inject_fault("scored_candidates", shard)
    return ShardOutcome(
        shard.index,
        {"": 0 if violation else len(scored)},
        str(violation) if violation else None,
        {
            "lineage": lineage,
            "utilities": utilities,
            "histogram": histogram.counts,
            "sample_rows": len(sample.rows()),
            "scoring": {"device": str(bundle.ranker.device), "precision": precision},
        },
    )


_SCORED_CHECKS = [_contract_check("scored_candidates")]


@dg.op(out=_merge_outs(_SCORED_CHECKS))
def scored_candidates_merge(
    context: dg.OpExecutionContext, recsys: RecsysResource, outcomes: list[ShardOutcome]
) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    """Every shard's scored candidates present and its own; score metadata over them."""
    _release_run_inputs("scoring_inputs")
    partition = SurfaceRegion.from_context(context)
    warehouse = recsys.warehouse()
    outcomes = _sorted(outcomes)
    folder = stage_path("scored_candidates", partition.path)
    if not any(outcome.violation for outcome in outcomes):
        _verified(warehouse, folder, _shard_subjects(warehouse, partition, len(outcomes)), outcomes)
    utilities = UniformSample(UTILITY_SAMPLE_ROWS)
    histogram = ScoreHistogram()
    for outcome in outcomes:
        utilities.merge(outcome.stats["utilities"])
        histogram.counts += outcome.stats["histogram"]
    sample_rows = sum(outcome.stats["sample_rows"] for outcome in outcomes)
    metadata: dict[str, Any] = {
        **outcomes[0].stats["lineage"],
        **distribution("utility", utilities.values, (0.05, 0.5, 0.95)),
        "utility_sample_rows": len(utilities.values),
        "score_histogram": histogram.to_markdown("candidates"),
        "feature_sample_rows": sample_rows,
        **{
            f"scoring_{name}": ", ".join(sorted({o.stats["scoring"][name] for o in outcomes}))
            for name in ("device", "precision")
        },
    }
    sample_path = f"{folder}/{FEATURE_SAMPLE}"
    if sample_rows:
        metadata["feature_sample"] = dg.MetadataValue.path(warehouse.uri(sample_path))
    yield from _merged("scored_candidates", warehouse, partition, outcomes, metadata)


scored_candidates = _sharded_asset(
    "scored_candidates",
    description="Gather each pool row's features from features_asof and score them in one "
    "pass: calibrated ranker predictions and utility with its components, with lineage; one "
    "step per subject shard.",
    upstream={
        "features_asof": dg.AssetKey("features_asof"),
        "model_bundle": dg.AssetKey("model_bundle"),
        **_raw("items", "interactions"),
    },
    folders=["", FEATURE_SAMPLE],
    shard_op=scored_candidates_shard,
    merge_op=scored_candidates_merge,
    check_specs=_SCORED_CHECKS,
    metadata=_schema("scored_candidates"),
    kinds={"torch", "parquet"},
)


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


# -- slates ----------------------------------------------------------------------------


@dg.op(retry_policy=SHARD_RETRY, tags=SHARD_STEP_TAGS)
def slates_shard(
    context: dg.OpExecutionContext, recsys: RecsysResource, shard: Shard
) -> ShardOutcome:
    """The slate policy over one shard's scored candidates."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)
    part = warehouse.dataset(shard_part_path("scored_candidates", partition.path, shard.index))
    scored = part.to_table(  # what the policy reads: not the predictions and components
        columns=[c for c in (*SCORED_COLUMNS, *OPTIONAL_LINEAGE_COLUMNS) if c in part.schema.names]
    ).to_pandas()
    slate = in_subject_blocks(
        scored,
        lambda block: build_slates(block, surface, seed=settings.training.seed),
        block_threads(settings.pipeline.step_threads),
    )
    lengths = (
        slate.groupby("subject_id").size().reindex(scored["subject_id"].unique(), fill_value=0)
    )
    violation = write_shard_part(
        warehouse,
        shard_part_path("slates", f"{partition.path}/{SHARDS_FOLDER}", shard.index),
        slate,  # in (subject_id, position) order, as build_slates lays it out
        lambda part: validate_stage("slates", part),
    )
    _inject_fault("slates", shard)
    return ShardOutcome(
        shard.index,
        {"": 0 if violation else len(slate)},
        str(violation) if violation else None,
        {"lengths": lengths.to_numpy(), "explored": int(slate["exploration"].sum())},
    )


_SLATE_CHECKS = [_contract_check("slates")]


@dg.op(out=_merge_outs(_SLATE_CHECKS))
def slates_merge(
    context: dg.OpExecutionContext, recsys: RecsysResource, outcomes: list[ShardOutcome]
) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    """Every shard's slates present and its own, then rewritten in subject order in blocks
    of `pipeline.shard_subjects` subjects: what publish reads, the same bytes whatever the
    shard count."""
    partition = SurfaceRegion.from_context(context)
    warehouse, settings = recsys.warehouse(), recsys.settings()
    surface = settings.surface(partition.surface)
    outcomes = _sorted(outcomes)
    folder = stage_path("slates", partition.path)
    shards_folder = f"{folder}/{SHARDS_FOLDER}"
    subjects_by_shard = _shard_subjects(warehouse, partition, len(outcomes))
    subject_ids = np.sort(np.concatenate(subjects_by_shard))
    blocks = shard_bounds(len(subject_ids), settings.pipeline.shard_subjects)
    last_subjects = (
        [int(subject_ids[stop - 1]) for _, stop in blocks]
        if len(subject_ids)
        else [int(np.iinfo(np.int64).max)]
    )
    if not any(outcome.violation for outcome in outcomes):
        _verified(warehouse, shards_folder, subjects_by_shard, outcomes)
        merge_in_subject_order(
            warehouse,
            [f"{shards_folder}/{part_name(o.shard)}" for o in outcomes],
            folder,
            last_subjects,
        )
    sizes = np.concatenate([outcome.stats["lengths"] for outcome in outcomes])
    yield from _merged(
        "slates",
        warehouse,
        partition,
        outcomes,
        {
            "parts": len(last_subjects),  # the subject-order blocks publish reads
            "slate_policy_version": surface.slate_policy.version,
            "exploration_seed": dg.MetadataValue.text(str(settings.training.seed)),
            **distribution("items_per_list", sizes),
            "lists": len(sizes),
            "empty_lists": int(len(subject_ids) - int((sizes > 0).sum())),
            "exploration_items": sum(outcome.stats["explored"] for outcome in outcomes),
        },
    )


slates = _sharded_asset(
    "slates",
    description="Slate policy: diversity caps, exploration slots (seed + propensity), "
    "sponsored cap; one step per subject shard, merged in subject order for publish.",
    upstream={"scored_candidates": dg.AssetKey("scored_candidates")},
    folders=[SHARDS_FOLDER],
    shard_op=slates_shard,
    merge_op=slates_merge,
    check_specs=_SLATE_CHECKS,
    metadata=_schema("slates"),
    kinds={"pandas", "parquet"},
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
