"""Contracts of the intermediate tables, one per pipeline stage (docs/DATA_MODEL.md).

The asset checks run `validate_stage` on every partition; a violation names the stage, the
column, the rule and sample rows, so a blocking check tells the operator what broke. Tables
whose documented columns are the whole table (subjects, candidate_pools) are strict; the
later stages carry pass-through and lineage columns and accept extra ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from recsys_assets.config.settings import SOURCES
from recsys_assets.contracts.errors import ContractViolation, violations_from_pandera
from recsys_assets.pipeline.features import (
    FEATURE_COLUMNS,
    HISTORY_SCORES,
    ITEM_FEATURES,
    USER_FEATURES,
)

RANK_COLUMNS = tuple(f"rank_{source}" for source in SOURCES)
UTILITY_COMPONENTS = (
    "utility_relevance",
    "utility_novelty",
    "utility_sponsored",
    "utility_exploration",
)


PROVENANCE_MATCHES_RANKS = "source_provenance must list exactly the sources with rank > 0"
NO_FUTURE_VALUES = "feature_timestamp must be <= score_time (no future values)"
POSITIONS_DENSE = "positions must be dense per subject: 1, 2, …, n"
ITEM_ONCE_PER_SUBJECT = "an item appears twice in one subject's slate"
_FRAME_CHECK_COLUMN = {
    PROVENANCE_MATCHES_RANKS: "source_provenance",
    NO_FUTURE_VALUES: "feature_timestamp",
    POSITIONS_DENSE: "position",
    ITEM_ONCE_PER_SUBJECT: "item_id",
}
"""Table-level rules and the column each is reported under (Pandera names every column)."""


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    """Table-level rules skip when a column is missing: that is reported on its own."""
    return all(column in frame.columns for column in columns)


def _finite(series: pd.Series) -> pd.Series:
    return pd.Series(np.isfinite(series.to_numpy(dtype=np.float64)), index=series.index)


def _per_distinct(series: pd.Series, rule: Callable[[str], Any]) -> tuple[np.ndarray, np.ndarray]:
    """(codes, rule applied to each distinct value): a text rule evaluated once per distinct
    value (a few hundred provenance labels), not once per row. A coded column
    (pipeline/text.py) is read by its codes; a missing value is judged as ''."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        distinct = [*series.cat.categories.astype(str), ""]
        codes = series.cat.codes.to_numpy().astype(np.int64)
        codes[codes < 0] = len(distinct) - 1
    else:
        codes, distinct = pd.factorize(series.astype(str), use_na_sentinel=False)
    return codes, np.array([rule(value) for value in distinct])


def _provenance_tokens_valid(provenance: pd.Series) -> pd.Series:
    """Non-empty, known sources in SOURCES order (the first is the primary), no repeats."""
    order = {source: position for position, source in enumerate(SOURCES)}

    def valid(text: str) -> bool:
        tokens = text.split("|")
        return (
            bool(text)
            and set(tokens) <= order.keys()
            and tokens == sorted(set(tokens), key=order.__getitem__)
        )

    codes, verdicts = _per_distinct(provenance, valid)
    return pd.Series(verdicts.astype(bool)[codes], index=provenance.index)


def _listed_sources(provenance: pd.Series) -> np.ndarray:
    """Per row, which sources its provenance names, as bits (bit b = SOURCES[b])."""

    def listed(text: str) -> int:
        tokens = set(text.split("|"))
        return sum(1 << bit for bit, source in enumerate(SOURCES) if source in tokens)

    codes, bits = _per_distinct(provenance, listed)
    return bits.astype(np.int64)[codes]


def _with_fields(name: str, base: type[pa.DataFrameModel], fields: dict[str, tuple]) -> type:
    """A contract with generated columns (one per source or per feature), named explicitly."""
    annotations = {column: Series[dtype] for column, (dtype, _) in fields.items()}
    namespace: dict = {"__annotations__": annotations, "__module__": __name__}
    namespace.update({column: field for column, (_, field) in fields.items()})
    return type(name, (base,), namespace)


class _Stage(pa.DataFrameModel):
    class Config:
        coerce = True
        strict = False


class Subjects(_Stage):
    """Who may receive this surface in this region (one row per subject)."""

    subject_id: Series[np.int64] = pa.Field(ge=0, unique=True, description="Recipient user_id")
    region: Series[str] = pa.Field(description="The partition's region")
    tenant_id: Series[str] = pa.Field(nullable=True, description="Enterprise tenant")
    actor_role: Series[str] = pa.Field(nullable=True, description="Role within the tenant")
    timezone: Series[str] = pa.Field(description="IANA timezone")
    quiet_hours_start: Series[np.int64] = pa.Field(ge=0, le=23, description="Local hour")
    quiet_hours_end: Series[np.int64] = pa.Field(ge=0, le=23, description="Local hour")
    last_active_at: Series[pd.Timestamp] = pa.Field(description="Last activity (UTC)")

    class Config:
        strict = True


_RankedCandidates = _with_fields(
    "_RankedCandidates",
    _Stage,
    {
        column: (np.int32, pa.Field(ge=0, description="1-based rank; 0 = not proposed"))
        for column in RANK_COLUMNS
    },
)
_ScoredHistory = _with_fields(
    "_ScoredHistory",
    _RankedCandidates,
    {
        column: (np.float32, pa.Field(description="History score (pipeline/features.py)"))
        for column in HISTORY_SCORES
    },
)


class CandidatePools(_ScoredHistory):  # type: ignore[misc, valid-type]
    """Merged multi-source candidates, one row per (subject, item)."""

    subject_id: Series[np.int64] = pa.Field(ge=0)
    item_id: Series[np.int64] = pa.Field(ge=0)
    source_provenance: Series[pd.CategoricalDtype] = pa.Field(
        description="Sorted '|'-joined sources (coded text: pipeline/text.py)"
    )
    retrieval_score: Series[np.float32] = pa.Field(nullable=True, description="Two-tower dot")
    candidate_policy_version: Series[pd.CategoricalDtype]

    class Config:
        strict = True
        unique = ("subject_id", "item_id")

    @pa.check("source_provenance", error="'|'-joined known sources in SOURCES order, no repeats")
    def provenance_tokens(cls, provenance: pd.Series) -> Series[bool]:
        return _provenance_tokens_valid(provenance)

    @pa.check("retrieval_score", error="must be finite or NaN (not ±inf)")
    def retrieval_score_not_infinite(cls, score: Series[np.float32]) -> Series[bool]:
        return _finite(score) | score.isna()

    @pa.check(*HISTORY_SCORES, error="must be finite (no NaN or ±inf)")
    def history_scores_finite(cls, values: Series[np.float32]) -> Series[bool]:
        return _finite(values)

    @pa.dataframe_check(error=PROVENANCE_MATCHES_RANKS)
    def provenance_matches_ranks(cls, frame: pd.DataFrame) -> Series[bool]:
        if not _has(frame, "source_provenance", *RANK_COLUMNS):
            return pd.Series(True, index=frame.index)
        ranked = np.zeros(len(frame), dtype=np.int64)
        for bit, column in enumerate(RANK_COLUMNS):
            ranked |= (frame[column].to_numpy() > 0).astype(np.int64) << bit
        return pd.Series(_listed_sources(frame["source_provenance"]) == ranked, index=frame.index)


_FeatureColumns = _with_fields(
    "_FeatureColumns",
    _RankedCandidates,
    {
        column: (np.float32, pa.Field(description="See pipeline/features.py"))
        for column in FEATURE_COLUMNS
    },
)


class FeatureRows(_FeatureColumns):  # type: ignore[misc, valid-type]
    """Point-in-time feature rows (training rows; scoring's debug sample); every value
    older than score_time."""

    subject_id: Series[np.int64] = pa.Field(ge=0)
    item_id: Series[np.int64] = pa.Field(ge=0)
    score_time: Series[pd.Timestamp]
    feature_timestamp: Series[pd.Timestamp] = pa.Field(description="Newest value used")
    source_provenance: Series[str]
    feature_set_version: Series[str]

    class Config:
        unique = ("subject_id", "item_id")

    @pa.check(*FEATURE_COLUMNS, error="must be finite (no NaN or ±inf)")
    def features_finite(cls, values: Series[np.float32]) -> Series[bool]:
        return _finite(values)

    @pa.dataframe_check(error=NO_FUTURE_VALUES)
    def no_future_values(cls, frame: pd.DataFrame) -> Series[bool]:
        if not _has(frame, "feature_timestamp", "score_time"):
            return pd.Series(True, index=frame.index)
        return frame["feature_timestamp"] <= frame["score_time"]


class _EntityFeatures(_Stage):
    """An entity table of features_asof: values as of score_time, all from before it."""

    score_time: Series[pd.Timestamp]
    feature_timestamp: Series[pd.Timestamp] = pa.Field(description="Newest value used")
    feature_set_version: Series[str]

    @pa.dataframe_check(error=NO_FUTURE_VALUES)
    def no_future_values(cls, frame: pd.DataFrame) -> Series[bool]:
        if not _has(frame, "feature_timestamp", "score_time"):
            return pd.Series(True, index=frame.index)
        return frame["feature_timestamp"] <= frame["score_time"]


def _entity_contract(
    name: str, doc: str, keys: dict[str, Any], values: tuple[str, ...], *, unique: int = 0
) -> type:
    """An entity table's contract: integer keys (the first `unique` of them, all when 0,
    unique together) and finite float32 values."""
    fields = {key: (np.int64, field) for key, field in keys.items()}
    fields.update(
        {
            value: (np.float32, pa.Field(description="See pipeline/feature_tables.py"))
            for value in values
        }
    )
    contract = _with_fields(name, _EntityFeatures, fields)
    key = tuple(keys)[: unique or len(keys)]

    class Config:
        coerce = True
        strict = False
        unique = key

    finite = pa.check(*values, error="must be finite (no NaN or ±inf)")(
        lambda cls, column: _finite(column)
    )
    return type(name, (contract,), {"Config": Config, "values_finite": finite, "__doc__": doc})


_SUBJECT_KEY = {"subject_id": pa.Field(ge=0)}
FEATURE_TABLE_CONTRACTS: dict[str, type[pa.DataFrameModel]] = {
    "subjects": _entity_contract(
        "SubjectFeatures",
        "One row per subject with engagement history.",
        _SUBJECT_KEY,
        USER_FEATURES,
    ),
    "items": _entity_contract(
        "ItemFeatures",
        "One row per catalog item or engaged item, with its category and creator codes.",
        {
            "item_id": pa.Field(ge=0),
            "category_code": pa.Field(ge=-1, description="-1: no catalog row"),
            "creator_code": pa.Field(ge=-1, description="-1: no catalog row"),
        },
        ITEM_FEATURES,
        unique=1,
    ),
    "subject_categories": _entity_contract(
        "SubjectCategoryFeatures",
        "One row per (subject, category) with engagement or a control.",
        {**_SUBJECT_KEY, "category_code": pa.Field(ge=0)},
        ("user_category_events", "category_hidden"),
    ),
    "subject_creators": _entity_contract(
        "SubjectCreatorFeatures",
        "One row per (subject, creator) with engagement or a control.",
        {**_SUBJECT_KEY, "creator_code": pa.Field(ge=0)},
        ("user_creator_events", "creator_hidden"),
    ),
    "exposures": _entity_contract(
        "ExposureFeatures",
        "One row per (subject, item) shown on the surface before score_time.",
        {**_SUBJECT_KEY, "item_id": pa.Field(ge=0)},
        ("shown_24h", "shown_7d"),
    ),
}
"""features_asof's entity tables (pipeline/feature_tables.py), stage `features_asof.<name>`."""


class ScoredCandidates(_Stage):
    """Ranked candidates with calibrated predictions, utility and its components.

    Scores are float32 (what the ranker computes); text columns are coded (pandas
    Categorical, Parquet dictionary pages: pipeline/text.py), since each repeats a few
    values across millions of rows."""

    subject_id: Series[np.int64] = pa.Field(ge=0)
    item_id: Series[np.int64] = pa.Field(ge=0)
    prediction: Series[np.float32] = pa.Field(ge=0, le=1, description="Raw ranker probability")
    calibrated: Series[np.float32] = pa.Field(ge=0, le=1, description="Calibrated probability")
    utility: Series[np.float32] = pa.Field(description="Documented function of the components")
    utility_relevance: Series[np.float32]
    utility_novelty: Series[np.float32]
    utility_sponsored: Series[np.float32]
    utility_exploration: Series[np.float32]
    item_type: Series[pd.CategoricalDtype]
    category: Series[pd.CategoricalDtype]
    creator_id: Series[pd.CategoricalDtype]
    is_sponsored: Series[bool]
    is_exploration_candidate: Series[bool]
    source_provenance: Series[pd.CategoricalDtype]
    model_version: Series[pd.CategoricalDtype]
    feature_set_version: Series[pd.CategoricalDtype]
    utility_policy_version: Series[pd.CategoricalDtype]
    score_time: Series[pd.Timestamp]
    pipeline_run_id: Series[pd.CategoricalDtype]

    class Config:
        unique = ("subject_id", "item_id")

    @pa.check("prediction", "calibrated", "utility", *UTILITY_COMPONENTS, error="must be finite")
    def scores_finite(cls, values: Series[float]) -> Series[bool]:
        return _finite(values)


class Slates(_Stage):
    """Per-subject slates of store_depth items, positions dense from 1."""

    subject_id: Series[np.int64] = pa.Field(ge=0)
    position: Series[np.int64] = pa.Field(ge=1, description="1-based, dense per subject")
    item_id: Series[np.int64] = pa.Field(ge=0)
    item_type: Series[str]
    category: Series[str]
    creator_id: Series[str]
    is_sponsored: Series[bool]
    score: Series[float] = pa.Field(description="The utility")
    calibrated: Series[float] = pa.Field(ge=0, le=1)
    reason_codes: Series[str]
    source_provenance: Series[str]
    exploration: Series[bool]
    propensity: Series[float] = pa.Field(gt=0, le=1, description="1.0 when deterministic")
    exploration_seed: Series[np.int64]
    slate_policy_version: Series[str]
    model_version: Series[str]
    feature_set_version: Series[str]
    utility_policy_version: Series[str]
    score_time: Series[pd.Timestamp]
    pipeline_run_id: Series[str]

    class Config:
        unique = ("subject_id", "position")

    @pa.check("score", "calibrated", "propensity", error="must be finite")
    def scores_finite(cls, values: Series[float]) -> Series[bool]:
        return _finite(values)

    @pa.dataframe_check(error=POSITIONS_DENSE)
    def positions_dense(cls, frame: pd.DataFrame) -> Series[bool]:
        if not _has(frame, "subject_id", "position"):
            return pd.Series(True, index=frame.index)
        ordered = frame.sort_values(["subject_id", "position"], kind="stable")
        expected = ordered.groupby("subject_id", sort=False).cumcount() + 1
        return (ordered["position"] == expected).reindex(frame.index)

    @pa.dataframe_check(error=ITEM_ONCE_PER_SUBJECT)
    def items_unique_per_subject(cls, frame: pd.DataFrame) -> Series[bool]:
        if not _has(frame, "subject_id", "item_id"):
            return pd.Series(True, index=frame.index)
        return ~frame.duplicated(subset=["subject_id", "item_id"], keep=False)


PIPELINE_CONTRACTS: dict[str, type[pa.DataFrameModel]] = {
    "subjects": Subjects,
    "candidate_pools": CandidatePools,
    **{f"features_asof.{name}": contract for name, contract in FEATURE_TABLE_CONTRACTS.items()},
    "feature_rows": FeatureRows,
    "scored_candidates": ScoredCandidates,
    "slates": Slates,
}
"""Every intermediate table and its contract, in pipeline order."""


def validate_stage(stage: str, frame: pd.DataFrame, *, source: str = "") -> pd.DataFrame:
    """Validate and coerce one stage's output; raise ContractViolation naming every problem.

    An empty frame is valid (a partition may have no eligible subjects) once its columns
    are right. `source` (e.g. the partition path) appears in the message. Coercion happens
    in place: a shard of millions of rows is not copied to be checked.
    """
    try:
        contract = PIPELINE_CONTRACTS[stage]
    except KeyError:
        raise ValueError(
            f"unknown pipeline stage {stage!r}; stages with contracts: {list(PIPELINE_CONTRACTS)}"
        ) from None
    try:
        return contract.validate(frame, lazy=True, inplace=True)
    except pa.errors.SchemaErrors as error:
        error.failure_cases = _one_row_per_finding(error.failure_cases, contract)
        raise ContractViolation(stage, violations_from_pandera(error, frame), source) from None


def _one_row_per_finding(cases: pd.DataFrame, contract: type[pa.DataFrameModel]) -> pd.DataFrame:
    """Report each table-level rule of these contracts under the column it is about.

    Pandera lists a table-level failure once per column of each failing row and a
    composite-key duplicate once per key column; the rules here each concern one column
    (position, item_id, feature_timestamp, source_provenance, the key's first column), so
    they are filed as that column's findings, with its failing values as samples.
    """
    cases = cases.copy()
    check = cases["check"].astype(str)
    unexpected = check == "column_in_schema"
    cases.loc[unexpected, "column"] = cases.loc[unexpected, "failure_case"].astype(str)
    keep = pd.Series(True, index=cases.index)
    about_one_column = pd.Series(False, index=cases.index)
    for message, column in _FRAME_CHECK_COLUMN.items():
        rule = check == message
        keep &= ~(rule & (cases["column"] != column))
        about_one_column |= rule
    composite = check == "multiple_fields_uniqueness"
    if composite.any():
        key = tuple(contract.to_schema().unique or ())
        keep &= ~composite | (cases["column"] == key[0])
        cases.loc[composite, "check"] = f"duplicate key ({', '.join(key)})"
        about_one_column |= composite
    cases.loc[about_one_column, "schema_context"] = "Column"
    return cases[keep]
