"""Why a refused version's lists are short or empty: its subjects by engagement history.

Sparse implicit data starves retrieval for subjects with little history: their candidate
pools are small, so their lists are short. When the length or empty-list check refuses a
version, the refusal says which history segments hold the short lists and which candidate
sources gave them (almost) nothing, so "cold-start subjects get no two-tower candidates" is
told apart from "a source is broken for everyone". It reads raw interactions and the
candidate pools, so it runs only on that refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from recsys_assets.config import SurfaceConfig
from recsys_assets.publish.validation import ValidationReport, rejection_reasons
from recsys_assets.rules.engagement import engagement_events
from recsys_assets.warehouse import Warehouse, partition_path

_SEGMENT_BOUNDS = ((0, 0), (1, 2), (3, 5), (6, 10), (11, None))
"""History segments: engagement events before score time, (lowest, highest or None)."""
POOL = "pool"
"""Column of a subject's candidate pool size, next to one column per source."""
STARVED_BELOW = 1.0
"""A source the surface asks candidates from is starved below this mean per subject."""
_MEASURES = {"mean_list_length_ratio": "short", "empty_list_rate": "empty"}
"""Check → the segment column its explanation is about."""
DIAGNOSED_CHECKS = frozenset(_MEASURES)


def _label(low: int, high: int | None) -> str:
    if high is None:
        return f"{low}+"
    return str(low) if low == high else f"{low}-{high}"


_LABELS = [_label(low, high) for low, high in _SEGMENT_BOUNDS]


def _span(labels: list[str]) -> str:
    """One label for neighbouring segments: "0" to "1-2" is "0-2"."""
    low = _SEGMENT_BOUNDS[_LABELS.index(labels[0])][0]
    return _label(low, _SEGMENT_BOUNDS[_LABELS.index(labels[-1])][1])


def _weighted(segments: pd.DataFrame) -> pd.Series:
    """The segments' columns averaged over their subjects (as if they were one segment)."""
    weights = segments["subjects"]
    return segments.drop(columns="subjects").mul(weights, axis=0).sum() / weights.sum()


@dataclass(frozen=True)
class ShortListDiagnosis:
    """The partition's subjects per history segment: how short their lists are, and why."""

    segments: pd.DataFrame
    """Index: segment label. Columns: subjects; short and empty (shares of subjects whose
    list has < short_below items / no item eligible now; no list counts as both); length
    (mean stored items); then, if the candidate pools were found, pool and one column per
    source (mean candidates per subject)."""
    short_below: float
    requested: tuple[str, ...]
    """Sources the surface asks candidates from (quota > 0)."""

    @property
    def sources(self) -> list[str]:
        columns = list(self.segments.columns)
        return columns[columns.index(POOL) + 1 :] if POOL in columns else []

    def explain(self, check: str) -> str:
        """Where the short (or empty) lists are, and what those subjects' pools held.

        Names the segments worse than the partition as a whole (else the worst), neighbours
        merged: "0" and "1-2" read as "0-2".
        """
        column = _MEASURES[check]
        share = self.segments[column]
        overall = _weighted(self.segments)[column]
        named = share > overall if (share > overall).any() else share == share.max()
        run = (~named).cumsum()[named]
        clauses = "; ".join(
            self._clause(list(labels.index), column) for _, labels in run.groupby(run)
        )
        what = (
            f"have < {self.short_below:g} items"
            if column == "short"
            else "have no item eligible now"
        )
        return f"{overall:.0%} of subjects {what}: {clauses}"

    def _clause(self, labels: list[str], column: str) -> str:
        rows = self.segments.loc[labels]
        row = _weighted(rows)
        head = (
            f"for subjects with {_span(labels)} events ({int(rows['subjects'].sum())} "
            f"subjects, {row[column]:.0%} {column}, mean list length {row['length']:.1f})"
        )
        if POOL not in row.index:
            return f"{head}; pool sizes unknown: no candidate_pools for this partition"
        proposed = ", ".join(f"{s} {row[s]:.1f}" for s in self.sources if row[s] > 0) or "none"
        starved = [s for s in self.requested if s in row.index and row[s] < STARVED_BELOW]
        tail = f"; starved: {', '.join(starved)}" if starved else ""
        return f"{head} the candidate pool averaged {row[POOL]:.1f} (sources: {proposed}{tail})"

    def to_markdown(self) -> str:
        """The segments as a Markdown table (Dagster check metadata, validation.json)."""
        means = [POOL, *self.sources] if POOL in self.segments.columns else []
        header = [
            "events before score time",
            "subjects",
            f"short (< {self.short_below:g} items)",
            "empty (none eligible now)",
            "mean list length",
            *(f"mean {name}" for name in means),
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for label, row in self.segments.iterrows():
            cells = [
                str(label),
                str(int(row["subjects"])),
                f"{row['short']:.0%}",
                f"{row['empty']:.0%}",
                f"{row['length']:.1f}",
                *(f"{row[name]:.1f}" for name in means),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if not means:
            lines += ["", "No candidate_pools for this partition: pool sizes unknown."]
        return "\n".join(lines)


def segment_subjects(
    lists: pd.DataFrame,
    *,
    eligible_now: np.ndarray,
    events: pd.Series,
    pools: pd.DataFrame | None,
    short_below: float,
    requested: tuple[str, ...],
) -> ShortListDiagnosis:
    """Group subjects (`events`' index) by history and measure each group's lists and pools.

    `lists` are lists.parquet rows, `eligible_now` whether each row is eligible now,
    `events` engagement events per subject before score time, `pools` candidates per
    subject (pool size and per source; None if the partition has none).
    """
    subject_ids = events.index
    length = lists.groupby("subject_id").size().reindex(subject_ids, fill_value=0)
    eligible = lists.loc[eligible_now, "subject_id"].value_counts()
    per_subject = pd.DataFrame(
        {
            "short": length < short_below,
            "empty": eligible.reindex(subject_ids, fill_value=0) == 0,
            "length": length,
        }
    )
    if pools is not None:
        per_subject = per_subject.join(pools.reindex(subject_ids, fill_value=0))
    edges = [-np.inf, *(high for _, high in _SEGMENT_BOUNDS[:-1]), np.inf]
    segment = pd.cut(events, bins=edges, labels=_LABELS)
    grouped = per_subject.astype("float64").groupby(segment, observed=True)
    segments = grouped.mean()
    segments.insert(0, "subjects", grouped.size())
    return ShortListDiagnosis(segments, short_below, requested)


def engagement_before(
    interactions: ds.Dataset, subject_ids: pd.Index, score_time: pd.Timestamp
) -> pd.Series:
    """Engagement events per subject before score time: the history its lists came from.

    Scanned batch by batch (only these subjects' rows), so memory stays bounded.
    """
    counts = pd.Series(0, index=subject_ids, dtype="int64")
    scan = interactions.to_batches(
        columns=["user_id", "event_type"],
        filter=ds.field("user_id").isin(subject_ids.to_numpy()) & (ds.field("ts") < score_time),
    )
    for batch in scan:
        events = batch.to_pandas()
        engaged = events.loc[engagement_events(events), "user_id"].value_counts()
        counts = counts.add(engaged.reindex(subject_ids, fill_value=0))
    return counts


def pool_sources(warehouse: Warehouse, surface: str, region: str) -> pd.DataFrame | None:
    """Per subject: its candidate pool size and how many candidates each source proposed.

    A source proposed an item when its `rank_<source>` is > 0. None when the partition has
    no candidate_pools. Read part by part (one per subject shard).
    """
    folder = f"pipeline/candidate_pools/{partition_path(surface=surface, region=region)}"
    parts = warehouse.parquet_parts(folder)
    if not parts:
        return None
    ranks = [name for name in warehouse.dataset(folder).schema.names if name.startswith("rank_")]
    counted = []
    for part in parts:
        pool = warehouse.read_parquet(part, columns=["subject_id", *ranks])
        proposed = pool[ranks].gt(0).astype("int64")
        proposed.columns = [rank.removeprefix("rank_") for rank in ranks]
        proposed.insert(0, POOL, 1)
        counted.append(proposed.groupby(pool["subject_id"]).sum())
    return pd.concat(counted).groupby(level=0).sum()


def explain_short_lists(
    report: ValidationReport,
    warehouse: Warehouse,
    lists: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    region: str,
    items: pd.DataFrame,
    subjects: pd.DataFrame | None,
    tombstones: pd.DataFrame | None,
    now: datetime,
    interactions: ds.Dataset,
    short_below: float,
) -> ValidationReport:
    """`report` with its length / empty-list failures explained by history segment.

    Unchanged (and nothing read) unless one of those checks failed. The segments are every
    eligible or listed subject, by engagement before the lists' score time; `lists`, `items`,
    `subjects` and `tombstones` are what the gate judged.
    """
    failing = report.failed_checks() & DIAGNOSED_CHECKS
    if not failing:
        return report
    listed = pd.Index(lists["subject_id"].unique())
    subject_ids = listed if subjects is None else listed.union(subjects["subject_id"].unique())
    reasons = rejection_reasons(
        lists, items, region=region, now=pd.Timestamp(now), subjects=subjects, tombstones=tombstones
    )
    diagnosis = segment_subjects(
        lists,
        eligible_now=reasons.isna().to_numpy(),
        events=engagement_before(
            interactions, subject_ids, pd.Timestamp(lists["generated_at"].min())
        ),
        pools=pool_sources(warehouse, surface.name, region),
        short_below=short_below,
        requested=tuple(source for source, quota in surface.sources.items() if quota > 0),
    )
    return report.with_diagnosis(
        {check: diagnosis.explain(check) for check in failing}, diagnosis.to_markdown()
    )
