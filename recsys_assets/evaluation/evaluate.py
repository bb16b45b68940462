"""Offline evaluation: split the warehouse's data, run the pipeline on the past, score the lists.

1. `temporal_holdout` splits the interactions per user (data/holdout.py documents how).
2. The training part is written as the raw snapshot of a *scratch* warehouse in a temporary
   folder: interactions truncated per the split; exposures and user controls up to the split
   time; only items known at the split time kept (see `training_tables`); users'
   last_active_at capped at it. The user's own warehouse is only read.
3. The pipeline (model bundle, then every chosen surface × every region) runs there on an
   ephemeral Dagster instance, its clock pinned to the split time.
4. Each subject's stored list — the published version when publishing succeeded, else the
   slates — is cut to its first K positions and scored against the held-out items, next
   to the baselines computed on the same training part, for the same users and catalog.

Diagnostics say where relevance is lost: the scored candidates ranked by utility without the
slate policy (the policy's cost), and how many relevant items each candidate source found.

A surface running an experiment also gets its arms compared on the same split
(`evaluation/arms.py`): each arm's serving mode on its subjects, and every mode on all.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import CONFIG_ENV_VAR, SOURCES
from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.holdout import HoldoutSplit, temporal_holdout
from recsys_assets.data.snapshot import RawSnapshotWriter
from recsys_assets.evaluation.arms import ArmComparison, ArmInputs, compare_arms
from recsys_assets.evaluation.baselines import BASELINES, baseline_lists, build_catalog
from recsys_assets.evaluation.metrics import ListMetrics, evaluate_lists
from recsys_assets.serving.experiments import experiment_of
from recsys_assets.warehouse import Warehouse

log = logging.getLogger(__name__)

DEFAULT_SURFACES = ("home_feed",)
DEFAULT_K = 20
DEFAULT_HOLDOUT = 0.2
DEFAULT_SEED = 0
LISTS = "lists"
UNCONSTRAINED = "utility_only"
"""The scored candidates ranked by utility alone: what the lists would be without slate policy."""
METHOD_LABELS = {
    LISTS: "lists",
    UNCONSTRAINED: "utility, no slate policy",
    "popularity": "popularity",
    "item_knn": "item-kNN (cosine)",
    "als": "ALS (implicit)",
    "ease": "EASE",
}
QUALITY_METRICS = ("recall", "ndcg")
"""The lists must beat every baseline on these."""


class EvaluationError(RuntimeError):
    """The evaluation could not produce lists to score; the message says what failed."""


@dataclass(frozen=True)
class SurfaceEvaluation:
    """Every method's metrics on one surface, for the same users."""

    surface: str
    lists_source: str
    """'published' (the active versions) or 'slates' (publishing refused or unavailable)."""
    users_not_subjects: int
    """Users with relevant items who are not subjects of this surface (not evaluated here)."""
    metrics: dict[str, ListMetrics]
    """Method (LISTS, UNCONSTRAINED, baselines) → metrics."""
    store_depth: int
    """Positions the surface stores per subject (its configured store_depth)."""
    mean_list_length: float
    """Mean stored list length (before the cut to K) over subjects with a training
    interaction; a subject without a list counts 0. Short lists mean thin candidate pools."""
    source_recall: dict[str, float] = field(default_factory=dict)
    """Share of relevant (user, item) pairs proposed by each candidate source, and 'any'."""
    notes: tuple[str, ...] = ()
    experiment: ArmComparison | None = None
    """The surface's experiment arms compared offline, when it runs one."""

    def beats_baselines(self) -> dict[str, bool]:
        """Per quality metric: the lists score above every baseline."""
        lists = self.metrics[LISTS].as_dict()
        return {
            metric: all(
                lists[metric] > self.metrics[name].as_dict()[metric]
                for name in BASELINES
                if name in self.metrics
            )
            for metric in QUALITY_METRICS
        }


@dataclass(frozen=True)
class EvaluationReport:
    """The split, each surface's evaluation and how long it took."""

    k: int
    split: dict[str, Any]
    surfaces: list[SurfaceEvaluation]
    warehouse: str
    config: str
    seconds: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per (surface, method), in table order."""
        found = []
        for evaluation in self.surfaces:
            for method, metrics in evaluation.metrics.items():
                found.append(
                    {
                        "surface": evaluation.surface,
                        "method": METHOD_LABELS.get(method, method),
                        **metrics.as_dict(),
                    }
                )
        return found

    def text_table(self) -> str:
        """The terminal table."""
        k = self.k
        header = (
            f"{'surface':<24} {'method':<26} {'users':>6} {f'recall@{k}':>10} "
            f"{f'ndcg@{k}':>9} {f'hit@{k}':>8} {'coverage':>9} {'diversity':>9}"
        )
        lines = [header, "-" * len(header)]
        for row in self.rows():
            lines.append(
                f"{row['surface']:<24} {row['method']:<26} {row['users']:>6} "
                f"{row['recall']:>10.4f} {row['ndcg']:>9.4f} {row['hit_rate']:>8.4f} "
                f"{row['coverage']:>9.4f} {row['diversity']:>9.4f}"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table as Markdown, for the Dagster UI."""
        k = self.k
        lines = [
            f"| surface | method | users | recall@{k} | ndcg@{k} | hit@{k} | coverage | diversity |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in self.rows():
            lines.append(
                f"| {row['surface']} | {row['method']} | {row['users']} | {row['recall']:.4f} "
                f"| {row['ndcg']:.4f} | {row['hit_rate']:.4f} | {row['coverage']:.4f} "
                f"| {row['diversity']:.4f} |"
            )
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "split": self.split,
            "warehouse": self.warehouse,
            "config": self.config,
            "seconds": round(self.seconds, 2),
            "surfaces": {
                evaluation.surface: {
                    "lists_source": evaluation.lists_source,
                    "users_not_subjects": evaluation.users_not_subjects,
                    "store_depth": evaluation.store_depth,
                    "mean_list_length": round(evaluation.mean_list_length, 2),
                    "metrics": {
                        method: metrics.as_dict() for method, metrics in evaluation.metrics.items()
                    },
                    "beats_baselines": evaluation.beats_baselines(),
                    "slate_policy_cost": _policy_cost(evaluation),
                    "source_recall": evaluation.source_recall,
                    "notes": list(evaluation.notes),
                    **(
                        {"experiment": evaluation.experiment.as_json()}
                        if evaluation.experiment is not None
                        else {}
                    ),
                }
                for evaluation in self.surfaces
            },
        }


def _policy_cost(evaluation: SurfaceEvaluation) -> dict[str, float]:
    """Metric of the unconstrained ranking minus that of the lists (positive = relevance lost)."""
    if UNCONSTRAINED not in evaluation.metrics:
        return {}
    lists = evaluation.metrics[LISTS].as_dict()
    free = evaluation.metrics[UNCONSTRAINED].as_dict()
    return {metric: round(free[metric] - lists[metric], 6) for metric in QUALITY_METRICS}


# -- the scratch warehouse ------------------------------------------------------------------


def training_tables(
    tables: dict[str, pd.DataFrame], split: HoldoutSplit
) -> dict[str, pd.DataFrame]:
    """The raw tables as they were at the split time, with interactions truncated per user.

    Items kept: those in the training interactions, and those never interacted with at all
    that were created by the split time. An item known only from held-out rows is dropped
    whatever its created_at says: keeping it would tell the pipeline which items the
    held-out users are about to engage with (imported created_at values are often derived
    from the interactions themselves).
    """
    cutoff = split.split_time
    train = split.train
    items = tables["items"]
    in_training = items["item_id"].isin(train["item_id"])
    never_used = ~items["item_id"].isin(tables["interactions"]["item_id"])
    items = items[in_training | (never_used & (items["created_at"] <= cutoff))]
    known = items["item_id"]
    users = tables["users"].assign(
        last_active_at=tables["users"]["last_active_at"].clip(upper=cutoff)
    )
    exposures = tables["exposures"]
    exposures = exposures[(exposures["ts"] <= cutoff) & exposures["item_id"].isin(known)]
    controls = tables["user_controls"]
    controls = controls[controls["ts"] <= cutoff]
    editorial = tables["editorial"]
    return {
        "users": users,
        "items": items,
        "interactions": train,
        "exposures": exposures,
        "user_controls": controls,
        "editorial": editorial[editorial["item_id"].isin(known)],
    }


def write_training_snapshot(
    scratch: Warehouse, tables: dict[str, pd.DataFrame], metadata: dict[str, Any]
) -> None:
    """Write the training tables as the scratch warehouse's raw snapshot."""
    writer = RawSnapshotWriter(scratch)
    writer.begin()
    for table in RAW_CONTRACTS:
        writer.write_part(table, tables[table].reset_index(drop=True))
    writer.finish(metadata)


# -- running the pipeline on the past -------------------------------------------------------


def run_pipeline_on(
    scratch: Warehouse,
    *,
    settings: Settings,
    config_path: str,
    surfaces: Sequence[str],
    score_time: pd.Timestamp,
    instance_dir: Path,
    progress: Callable[[str], None],
) -> dict[str, str]:
    """Train the bundle and refresh every (surface, region) in `scratch`; errors by partition.

    Imported here, not at module level: the metrics and baselines must work (and be tested)
    without the pipeline's torch models and Dagster graph.
    """
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from recsys_assets.pipeline.assets import PIPELINE_ASSETS
    from recsys_assets.pipeline.jobs import refresh_lists_job, train_model_bundle_job
    from recsys_assets.pipeline.partitions import bind_partitions
    from recsys_assets.pipeline.resources import RecsysResource
    from recsys_assets.pipeline.runner import quiet_migrations, run_pipeline, select_partitions

    assets: list[Any] = [*PIPELINE_ASSETS]
    try:
        from recsys_assets.publish.assets import published_lists

        assets.append(published_lists)
    except ImportError as error:
        progress(f"publishing unavailable ({error}); evaluating the slates")
    definitions = dg.Definitions(
        # Partitions from the evaluated configuration, as the resource below reads it.
        assets=bind_partitions(assets, settings),
        jobs=[train_model_bundle_job, refresh_lists_job],
        resources={
            "recsys": RecsysResource(
                warehouse_url=scratch.url,
                config_path=config_path,
                score_time=score_time.isoformat(),
            ),
            "duckdb": DuckDBResource(database=":memory:"),
        },
    )
    partitions = select_partitions(settings, surfaces, None)
    quiet_migrations()
    instance = dg.DagsterInstance.ephemeral(tempdir=str(instance_dir))
    try:
        outcomes = run_pipeline(
            definitions, instance, partitions, train_model=True, progress=progress
        )
    except RuntimeError as error:  # the model bundle could not be trained
        raise EvaluationError(f"the pipeline failed on the training part: {error}") from error
    finally:
        instance.dispose()
    return {
        f"{outcome.partition.surface}/{outcome.partition.region}": outcome.error
        for outcome in outcomes
        if not outcome.success
    }


# -- reading what the pipeline produced ------------------------------------------------------


def _stage(scratch: Warehouse, asset: str, surface: str, region: str, columns: list[str]):
    folder = f"pipeline/{asset}/surface={surface}/region={region}"
    if not scratch.parquet_parts(folder):
        return None
    return scratch.read_parquet(folder, columns=columns)


def surface_lists(
    scratch: Warehouse, surface: str, regions: Sequence[str]
) -> tuple[pd.DataFrame, str]:
    """Every subject's stored list (`user_id`, `rank`, `item_id`) and where it was read from.

    The published version is read where every region has one; otherwise the slates. A
    `storage_mode: candidate_pool` version holds shortlists: their stored slate (the rows
    `in_slate`, first in position order) is the list.
    """
    published = _published_lists(scratch, surface, regions)
    if published is not None:
        return published, "published"
    frames = []
    for region in regions:
        slate = _stage(scratch, "slates", surface, region, ["subject_id", "position", "item_id"])
        if slate is None:
            raise EvaluationError(
                f"the pipeline left no slates for surface={surface} region={region} in the "
                "scratch warehouse"
            )
        frames.append(slate)
    lists = pd.concat(frames, ignore_index=True)
    return lists.rename(columns={"subject_id": "user_id", "position": "rank"}), "slates"


def _published_lists(
    scratch: Warehouse, surface: str, regions: Sequence[str]
) -> pd.DataFrame | None:
    try:
        from recsys_assets.publish.manifest import active_lists
        from recsys_assets.publish.validation import IN_SLATE_COLUMN
    except ImportError:
        return None
    frames = []
    for region in regions:
        try:
            lists = active_lists(scratch, surface, region)
        except FileNotFoundError:
            return None
        personal = lists[lists["subject_id"] >= 0]
        if IN_SLATE_COLUMN in personal.columns:
            personal = personal[personal[IN_SLATE_COLUMN].to_numpy(dtype=bool)]
        frames.append(personal[["subject_id", "position", "item_id"]])
    lists = pd.concat(frames, ignore_index=True)
    return lists.rename(columns={"subject_id": "user_id", "position": "rank"})


def mean_list_length(lists: pd.DataFrame, subjects: np.ndarray, train: pd.DataFrame) -> float:
    """Mean distinct items per stored list over subjects with a training interaction (0 if none).

    Subjects without history get whatever cold-start lists the surface has; they are left out
    so the figure says how full personal lists are.
    """
    active = np.intersect1d(subjects, train["user_id"].to_numpy(dtype=np.int64))
    if len(active) == 0:
        return 0.0
    lengths = lists.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    return float(lengths.reindex(active, fill_value=0).mean())


def surface_subjects(scratch: Warehouse, surface: str, regions: Sequence[str]) -> np.ndarray:
    """Every subject of the surface, all regions."""
    frames = [
        frame["subject_id"]
        for region in regions
        if (frame := _stage(scratch, "subjects", surface, region, ["subject_id"])) is not None
    ]
    if not frames:
        return np.array([], dtype=np.int64)
    return np.unique(pd.concat(frames).to_numpy(dtype=np.int64))


def utility_ranking(
    scratch: Warehouse, surface: str, regions: Sequence[str], depth: int
) -> pd.DataFrame | None:
    """The scored candidates ranked by utility alone (ties: smaller item id), top `depth`."""
    frames = []
    for region in regions:
        scored = _stage(
            scratch, "scored_candidates", surface, region, ["subject_id", "item_id", "utility"]
        )
        if scored is None:
            return None
        ordered = scored.sort_values(
            ["subject_id", "utility", "item_id"], ascending=[True, False, True]
        )
        top = ordered.groupby("subject_id", sort=False).head(depth)
        frames.append(top.assign(rank=top.groupby("subject_id", sort=False).cumcount() + 1))
    ranked = pd.concat(frames, ignore_index=True)
    return ranked.rename(columns={"subject_id": "user_id"})[["user_id", "rank", "item_id"]]


def source_recall(
    scratch: Warehouse, surface: str, regions: Sequence[str], relevant: pd.DataFrame
) -> dict[str, float]:
    """Share of relevant (user, item) pairs each candidate source proposed ('any': the pool)."""
    if relevant.empty:
        return {}
    rank_columns = [f"rank_{source}" for source in SOURCES]
    frames = []
    for region in regions:
        pool = _stage(
            scratch, "candidate_pools", surface, region, ["subject_id", "item_id", *rank_columns]
        )
        if pool is None:
            return {}
        frames.append(
            pool.rename(columns={"subject_id": "user_id"}).merge(
                relevant, on=["user_id", "item_id"], how="inner"
            )
        )
    found = pd.concat(frames, ignore_index=True)
    total = len(relevant)
    shares = {"any": len(found) / total}
    for source, column in zip(SOURCES, rank_columns, strict=True):
        shares[source] = float((found[column] > 0).sum() / total)
    return {name: round(value, 4) for name, value in shares.items()}


# -- the whole evaluation -------------------------------------------------------------------


def evaluate(
    warehouse: Warehouse,
    *,
    surfaces: Sequence[str] = DEFAULT_SURFACES,
    k: int = DEFAULT_K,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = DEFAULT_SEED,
    config_path: str | None = None,
    progress: Callable[[str], None] = log.info,
) -> EvaluationReport:
    """Evaluate `surfaces`' lists and the baselines on a temporal holdout of `warehouse`."""
    started = time.monotonic()
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    settings = load_settings(config_path)
    chosen = [settings.surface(name).name for name in dict.fromkeys(surfaces)]
    unpersonalized = [name for name in chosen if not settings.surfaces[name].personalized]
    if unpersonalized:
        raise ValueError(
            f"surface(s) {unpersonalized} are not personalized: there are no per-user lists "
            "to evaluate; choose a personalized surface"
        )
    tables = {table: read_raw(warehouse, table) for table in RAW_CONTRACTS}
    parent = read_snapshot(warehouse)
    split = temporal_holdout(tables["interactions"], holdout=holdout, seed=seed)
    summary = split.summary()
    progress(
        f"split: {summary['train_interactions']} training / {summary['held_out_interactions']} "
        f"held-out interactions, {summary['users_evaluated']} users with relevant items "
        f"({summary['users_excluded_no_relevant']} without, excluded), as of {split.split_time}"
    )
    past = training_tables(tables, split)

    with tempfile.TemporaryDirectory(prefix="recsys-evaluate-") as folder:
        scratch = Warehouse((Path(folder) / "warehouse").as_uri())
        write_training_snapshot(
            scratch,
            past,
            {
                "source": "evaluation",
                "parent_snapshot": parent.get("snapshot_id"),
                "as_of": split.split_time.isoformat(),
                "split": summary,
            },
        )
        failures = run_pipeline_on(
            scratch,
            settings=settings,
            config_path=str(Path(config_path).resolve()) if config_path else "",
            surfaces=chosen,
            score_time=split.split_time,
            instance_dir=Path(folder) / "dagster",
            progress=progress,
        )
        evaluations = [
            _evaluate_surface(
                scratch,
                settings,
                surface,
                split,
                past,
                k=k,
                seed=seed,
                failures=failures,
            )
            for surface in chosen
        ]
    return EvaluationReport(
        k=k,
        split=summary,
        surfaces=evaluations,
        warehouse=warehouse.url,
        config=str(config_path or os.environ.get(CONFIG_ENV_VAR) or "default"),
        seconds=time.monotonic() - started,
    )


def _evaluate_surface(
    scratch: Warehouse,
    settings: Settings,
    surface: str,
    split: HoldoutSplit,
    past: dict[str, pd.DataFrame],
    *,
    k: int,
    seed: int,
    failures: dict[str, str],
) -> SurfaceEvaluation:
    regions = list(settings.surface_regions(surface))
    notes = [
        f"{where}: {error}" for where, error in failures.items() if where.startswith(f"{surface}/")
    ]
    try:
        lists, lists_source = surface_lists(scratch, surface, regions)
    except EvaluationError as error:
        reported = "; ".join(notes) or "none reported"
        raise EvaluationError(f"{error}. Pipeline errors: {reported}") from None
    subjects = surface_subjects(scratch, surface, regions)
    users = np.intersect1d(split.evaluated_users, subjects)
    if len(users) == 0:
        raise EvaluationError(
            f"no subject of surface {surface} has a relevant held-out item: nothing to "
            "evaluate (more data, a larger --holdout, or a surface with more subjects)"
        )
    display_count = settings.surface(surface).display_count
    if k > display_count:
        notes.append(f"K={k} is deeper than display_count={display_count}")
    left_out = len(split.evaluated_users) - len(users)
    if left_out:
        notes.append(
            f"{left_out:,} of {len(split.evaluated_users):,} held-out users are not subjects "
            f"of {surface} (its eligibility, e.g. active_within_days, left them out): the "
            f"metrics cover the other {len(users):,}"
        )
    catalog = build_catalog(
        past["items"],
        past["users"],
        now=split.split_time,
        tenant_items="tenant_actor" in settings.surface(surface).eligibility.requires,
    )
    relevant = split.relevant[split.relevant["user_id"].isin(users)]

    def score(recommendations: pd.DataFrame, who: np.ndarray = users) -> ListMetrics:
        return evaluate_lists(
            recommendations,
            relevant[relevant["user_id"].isin(who)],
            k=k,
            catalog_size=max(catalog.size, 1),
            item_categories=catalog.categories,
            users=who,
        )

    metrics = {LISTS: score(lists)}
    unconstrained = utility_ranking(scratch, surface, regions, k)
    if unconstrained is not None:
        metrics[UNCONSTRAINED] = score(unconstrained)
    baselines = baseline_lists(split.train, catalog, users, k=k, seed=seed, holdout=split.holdout)
    for name, baseline in baselines.items():
        metrics[name] = score(baseline)
    experiment = experiment_of(settings.surface(surface))
    comparison = (
        compare_arms(
            experiment,
            ArmInputs(settings, surface, regions, split.split_time, past, lists, scratch),
            users,
            score,
        )
        if experiment is not None
        else None
    )
    return SurfaceEvaluation(
        surface=surface,
        lists_source=lists_source,
        users_not_subjects=len(np.setdiff1d(split.evaluated_users, subjects)),
        metrics=metrics,
        store_depth=settings.surface(surface).store_depth,
        mean_list_length=mean_list_length(lists, subjects, split.train),
        source_recall=source_recall(scratch, surface, regions, relevant),
        notes=tuple(notes),
        experiment=comparison,
    )
