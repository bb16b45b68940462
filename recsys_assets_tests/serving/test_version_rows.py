"""A loaded version keeps a few numbers per list in memory and its rows in a local file read
per request: every list must read back exactly as lists.parquet holds it (items, scores,
probabilities, reason and provenance tokens, list id, model, times), whether the file was
streamed in order (lists spanning row groups) or sorted in memory, and item positions in
the catalog must be what `ItemStateArrays.positions` says (property tests)."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.rules.eligibility import ItemStateArrays
from recsys_assets.serving.store import PublishedVersion, read_version
from recsys_assets.warehouse import Warehouse

GENERATED = pd.Timestamp("2026-11-20 05:00")
REASONS = ["two_tower|high_confidence", "trending", "", None]
SOURCES = ["two_tower|trending", "collaborative", None]
ITEM_IDS = st.one_of(st.integers(0, 40), st.sampled_from([-1, 10**12, 2**63 - 1]))


@st.composite
def _lists(draw: st.DrawFn, *, fallback: bool) -> pd.DataFrame:
    """lists.parquet rows: per list, positions 1..n, random items, scores and tokens."""
    keys = draw(
        st.lists(
            st.sampled_from(["popular_by_region", "new_user_default", "tenant_default_actions:t1"])
            if fallback
            else st.integers(0, 10**6),
            min_size=1,
            max_size=6,
            unique=True,
        )
    )
    rows = []
    for number, key in enumerate(keys):
        subject_id, context = (-1, key) if fallback else (key, "default")
        generated = GENERATED + pd.Timedelta(minutes=number)
        for position in range(1, draw(st.integers(1, 7)) + 1):
            score = draw(st.one_of(st.floats(-5, 5), st.just(float("nan"))))
            rows.append(
                {
                    "list_id": f"list_{key}",
                    "subject_id": subject_id,
                    "context_key": context,
                    "generated_at": generated,
                    "expires_at": generated + pd.Timedelta(hours=6),
                    "model_version": draw(st.sampled_from(["m1", "m2", None])),
                    "position": position,
                    "item_id": draw(ITEM_IDS),
                    "score": score,
                    "calibrated": draw(st.one_of(st.floats(0, 1), st.none())),
                    "reason_codes": draw(st.sampled_from(REASONS)),
                    "source_provenance": draw(st.sampled_from(SOURCES)),
                }
            )
    return pd.DataFrame(rows).astype({"item_id": "int64", "position": "int32"})


def _load(lists: pd.DataFrame, *, fallback: bool, row_group_rows: int) -> PublishedVersion:
    """Write `lists` as a version's lists.parquet (small row groups) and load it."""
    with tempfile.TemporaryDirectory() as folder:
        warehouse = Warehouse(folder)
        target = warehouse.path("versions/v1/lists.parquet")
        warehouse.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        table = pa.Table.from_pandas(lists, preserve_index=False)
        pq.write_table(table, target, row_group_size=row_group_rows)
        return read_version(
            warehouse, surface="home_feed", region="na", version="v1", path="versions/v1",
            fallback=fallback,
        )  # fmt: skip


def _read_back(version: PublishedVersion, index: int) -> dict[str, Any]:
    start, stop = int(version.starts[index]), int(version.starts[index + 1])
    return {
        "list_id": version.list_ids[index],
        "subject_id": int(version.subject_ids[index]),
        "model_version": version.model_versions[index] or None,
        "generated_at": int(version.generated_at_ns[index]),
        "expires_at": int(version.expires_at_ns[index]),
        "item_id": version.item_ids[start:stop].tolist(),
        "score": version.scores[start:stop].tolist(),
        "calibrated": version.calibrated[start:stop].tolist(),
        "reason_codes": [version.reason_values[c] for c in version.reason_codes[start:stop]],
        "source_provenance": [
            version.provenance_values[c] for c in version.provenance_codes[start:stop]
        ],
    }


def _expected(rows: pd.DataFrame) -> dict[str, Any]:
    """What the list's rows say, in position order."""
    first = rows.iloc[0]
    return {
        "list_id": first["list_id"],
        "subject_id": int(first["subject_id"]),
        "model_version": None if pd.isna(first["model_version"]) else first["model_version"],
        "generated_at": pd.Timestamp(first["generated_at"]).value,
        "expires_at": pd.Timestamp(first["expires_at"]).value,
        "item_id": rows["item_id"].tolist(),
        "score": rows["score"].tolist(),
        "calibrated": rows["calibrated"].astype("float64").tolist(),
        "reason_codes": [_tokens(value) for value in rows["reason_codes"]],
        "source_provenance": [_tokens(value) for value in rows["source_provenance"]],
    }


def _tokens(value: Any) -> tuple[str, ...]:
    return () if value is None or pd.isna(value) else tuple(t for t in value.split("|") if t)


def _same(found: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Equal, NaN equal to NaN."""
    return {k: v for k, v in found.items() if k not in ("score", "calibrated")} == {
        k: v for k, v in expected.items() if k not in ("score", "calibrated")
    } and all(
        np.array_equal(np.array(found[k]), np.array(expected[k]), equal_nan=True)
        for k in ("score", "calibrated")
    )


@settings(max_examples=60, deadline=None)
@given(
    lists=st.one_of(_lists(fallback=False), _lists(fallback=True)),
    shuffled=st.booleans(),
    row_group_rows=st.integers(1, 8),
)
def test_every_list_reads_back_as_written(
    lists: pd.DataFrame, shuffled: bool, row_group_rows: int
) -> None:
    fallback = bool((lists["subject_id"] == -1).all())
    key = "context_key" if fallback else "subject_id"
    ordered = lists.sort_values([key, "position"], kind="stable")  # as publish writes them
    written = lists.sample(frac=1, random_state=7) if shuffled else ordered
    version = _load(written, fallback=fallback, row_group_rows=row_group_rows)

    expected = [_expected(rows) for _, rows in ordered.groupby(key, sort=True)]
    assert version.list_count == len(expected)
    assert version.row_count == len(lists)
    for index, wanted in enumerate(expected):
        assert _same(_read_back(version, index), wanted), index
        if fallback:
            assert version.find_context(ordered[key].unique()[index]) == index
        else:
            assert version.find_subject(wanted["subject_id"]) == index


@settings(max_examples=60, deadline=None)
@given(
    lists=_lists(fallback=False),
    catalog=st.lists(st.integers(0, 40), unique=True)
    | st.lists(st.integers(0, 10**12), unique=True, max_size=5),
)
def test_item_positions_are_the_catalogs(lists: pd.DataFrame, catalog: list[int]) -> None:
    """Dense catalogs are looked up in a table, sparse ones searched: same positions."""
    arrays = ItemStateArrays.from_items(
        pd.DataFrame(
            {
                "item_id": pd.Series(catalog, dtype="int64"),
                "category": "k",
                "creator_id": "c",
                "regions": "*",
                "status": "active",
                "policy_state": "approved",
                "stock": 1,
                "is_sponsored": False,
                "campaign_end": pd.Series([pd.NaT] * len(catalog), dtype="datetime64[ns]"),
                "tenant_id": pd.Series([None] * len(catalog), dtype=object),
                "required_role": pd.Series([None] * len(catalog), dtype=object),
                "case_state": pd.Series([None] * len(catalog), dtype=object),
            }
        ),
        ("na",),
    )
    version = _load(lists, fallback=False, row_group_rows=4)
    positions = version.positions_in(arrays)
    for index in range(version.list_count):
        start, stop = int(version.starts[index]), int(version.starts[index + 1])
        items = np.asarray(version.item_ids[start:stop].tolist(), dtype=np.int64)
        assert positions[start:stop].tolist() == arrays.positions(items).tolist()


@settings(max_examples=60, deadline=None)
@given(
    lists=_lists(fallback=False),
    data=st.data(),
    shuffled=st.booleans(),
    row_group_rows=st.integers(1, 8),
)
def test_a_shortlists_stored_slate_ends_where_its_in_slate_rows_do(
    lists: pd.DataFrame, data: st.DataObject, shuffled: bool, row_group_rows: int
) -> None:
    """A candidate-pool shortlist's stored slate is its `in_slate` rows, first in position
    order: `slate_stops` finds where they end per list, across row groups and batches."""
    sizes = lists.groupby("subject_id").size()
    slate = {int(s): data.draw(st.integers(0, int(n)), label=str(s)) for s, n in sizes.items()}
    lists["in_slate"] = lists["position"] <= lists["subject_id"].map(slate)
    written = lists.sample(frac=1, random_state=7) if shuffled else lists
    version = _load(written, fallback=False, row_group_rows=row_group_rows)
    found = version.slate_stops - version.starts[:-1]
    assert found.tolist() == [slate[int(s)] for s in version.subject_ids]

    without = _load(lists.drop(columns="in_slate"), fallback=False, row_group_rows=4)
    assert without.slate_stops.tolist() == without.starts[1:].tolist()  # all of a slate


def test_in_slate_rows_after_a_candidate_refuse_the_version() -> None:
    lists = pd.DataFrame(
        {
            "list_id": "list_1",
            "subject_id": 1,
            "context_key": "default",
            "generated_at": GENERATED,
            "expires_at": GENERATED + pd.Timedelta(hours=6),
            "model_version": "m1",
            "position": pd.Series([1, 2, 3], dtype="int32"),
            "item_id": pd.Series([10, 11, 12], dtype="int64"),
            "score": 1.0,
            "calibrated": 0.5,
            "reason_codes": "trending",
            "source_provenance": "trending",
            "in_slate": [True, False, True],
        }
    )
    with pytest.raises(ValueError, match="in_slate rows do not come first in position order"):
        _load(lists, fallback=False, row_group_rows=2)
