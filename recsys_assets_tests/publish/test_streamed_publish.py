"""Publish streams a partition part by part: the gate measured part by part reports what it
reports on the whole version, and a partition published from several slates parts is the
version its slates published whole would be (same rows, same decision log, same report),
with the manifest flipped only for a version that passed."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.config import load_settings
from recsys_assets.data import read_snapshot
from recsys_assets.publish import publish_version, read_manifest
from recsys_assets.publish.lists import finalize_lists, lists_from_slates
from recsys_assets.publish.publisher import publish_partition, publish_parts
from recsys_assets.publish.validation import (
    GateLimits,
    ValidationReport,
    validate_lists,
    validate_parts,
    whole_lists,
)
from recsys_assets.publish.versions import DECISION_LOG_FILE, LISTS_FILE, manifest_path
from recsys_assets.rules.person import EVENT_COLUMNS, PersonFacts
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import (
    NOW,
    REGION,
    SURFACE,
    later,
    make_items,
    make_lists,
    make_slates,
    make_subjects,
    make_users,
    write_raw_snapshot,
)

CONFIG = load_settings()
LIMITS = GateLimits.for_lists(CONFIG.publish.thresholds)


def _comparable(report: ValidationReport) -> dict[str, Any]:
    """The report, with the score mean and spread (merged across parts, equal up to
    floating-point rounding) compared separately."""
    found = report.to_dict()
    scores = {name: found["metrics"].pop(name, None) for name in ("score_mean", "score_std")}
    spread = next((c for c in found["checks"] if c["name"] == "score_spread"), None)
    if spread is not None:
        scores["spread_value"] = spread.pop("value")
    return {"report": found, "scores": scores}


def _assert_same(parted: ValidationReport, whole: ValidationReport) -> None:
    found, wanted = _comparable(parted), _comparable(whole)
    assert found["report"] == wanted["report"]
    for name, value in wanted["scores"].items():
        if value is None:
            assert found["scores"][name] is None, name
        else:
            assert found["scores"][name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


@st.composite
def _damaged_lists(draw: st.DrawFn) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(list records, items, subjects) with random defects the gate measures: unknown,
    banned and duplicated items, gaps in positions, missing and non-finite scores, a
    category over its cap, a list missing, a list every item of which is now invalid."""
    n_subjects = draw(st.integers(1, 12))
    lists, items, subjects = make_lists(n_subjects=n_subjects)
    rows = len(lists)
    picked = st.lists(st.integers(0, rows - 1), max_size=6, unique=True)
    lists.loc[draw(picked), "item_id"] = 10_000  # unknown
    lists.loc[draw(picked), "item_id"] = 1  # duplicates where 1 is listed already
    lists.loc[draw(picked), "position"] = 99
    lists.loc[draw(picked), "score"] = draw(st.sampled_from([np.nan, np.inf, 0.5]))
    items.loc[items["item_id"].isin(draw(st.lists(st.integers(1, 60), max_size=8))), "policy_state"] = "banned"  # fmt: skip
    items.loc[items["item_id"].isin([4, 5, 6]), "category"] = draw(
        st.sampled_from(["same", "cat4"])
    )
    dropped = draw(st.lists(st.sampled_from(subjects["subject_id"].tolist()), max_size=2))
    lists = lists[~lists["subject_id"].isin(dropped)]
    if draw(st.booleans()):
        lists["score"] = 0.25  # constant scores
    return lists, items, subjects


def _person(subjects: pd.DataFrame, lists: pd.DataFrame, seed: int) -> PersonFacts:
    """Person facts: a revoked consent, a hide and a purchase among the listed people."""
    rng = np.random.default_rng(seed)
    users = make_users(subjects)
    users.loc[rng.random(len(users)) < 0.4, "consent_personalization"] = False
    listed = lists.sample(n=min(4, len(lists)), random_state=seed)
    hides = listed.iloc[:2]
    return PersonFacts(
        users=users,
        interactions=pd.DataFrame(
            {
                "user_id": listed["subject_id"].iloc[2:],
                "item_id": listed["item_id"].iloc[2:],
                "event_type": "purchase",
            }
        ),
        user_controls=pd.DataFrame(
            {
                "user_id": hides["subject_id"].astype("int64"),
                "target_type": "item",
                "target_id": hides["item_id"].astype(str),
                "action": "hide",
                "ts": pd.Timestamp(NOW),
            }
        ),
        events=pd.DataFrame(columns=EVENT_COLUMNS).astype(
            {
                "user_id": "int64",
                "item_id": "Int64",
                "ts": "datetime64[ns]",
                "received_at": "datetime64[ns]",
            }
        ),
    )


@settings(max_examples=150, deadline=None)
@given(
    world=_damaged_lists(),
    cuts=st.lists(st.integers(1, 30), min_size=1, max_size=8),
    with_person=st.booleans(),
)
def test_the_gate_part_by_part_reports_what_it_reports_whole(
    world: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame], cuts: list[int], with_person: bool
) -> None:
    lists, items, subjects = world
    records = finalize_lists(lists, surface=SURFACE, region=REGION, version="v1", fallback=False)
    person = _person(subjects, records, seed=sum(cuts)) if with_person else None
    gate = {
        "surface": CONFIG.surface(SURFACE),
        "region": REGION,
        "items": items,
        "limits": LIMITS,
        "now": later(1),
        "subjects": subjects,
        "person": person,
    }
    bounds = np.cumsum([0, *cuts])
    frames = [records.iloc[start:stop] for start, stop in pairwise(bounds)]
    frames.append(records.iloc[bounds[-1] :])  # the rest, cut anywhere, even inside a list

    _assert_same(validate_parts(whole_lists(frames), **gate), validate_lists(records, **gate))


def test_a_list_cut_across_parts_is_refused_rather_than_miscounted() -> None:
    lists, items, subjects = make_lists(n_subjects=2)
    records = finalize_lists(lists, surface=SURFACE, region=REGION, version="v1", fallback=False)
    with pytest.raises(ValueError, match="two parts"):
        validate_parts(
            [records.iloc[:3], records.iloc[3:]],  # list 1's rows in both parts
            surface=CONFIG.surface(SURFACE), region=REGION, items=items, limits=LIMITS,
            now=later(1), subjects=subjects,
        )  # fmt: skip


def _stage(warehouse: Warehouse, *, shards: int, banned: bool = False) -> pd.DataFrame:
    """Raw snapshot, subjects and slates written as `shards` subject-ordered parts."""
    items = make_items(60)
    subjects = make_subjects(9)
    slates = make_slates(subjects, items, depth=CONFIG.surface(SURFACE).store_depth)
    if banned:
        items.loc[items["item_id"] <= 20, "policy_state"] = "banned"
    write_raw_snapshot(warehouse, users=make_users(subjects), items=items)
    where = f"surface={SURFACE}/region={REGION}"
    bounds = np.linspace(0, len(subjects), shards + 1).astype(int)
    for index, (start, stop) in enumerate(pairwise(bounds)):
        part = f"part-{index:05d}.parquet"
        shard = subjects.iloc[start:stop]
        warehouse.write_parquet(f"pipeline/subjects/{where}/{part}", shard)
        warehouse.write_parquet(
            f"pipeline/slates/{where}/{part}",
            slates[slates["subject_id"].isin(shard["subject_id"])],
        )
    return slates


def _version_files(warehouse: Warehouse, folder: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """lists.parquet and decision_log.parquet without what names the version itself."""
    lists = warehouse.read_parquet(f"{folder}/{LISTS_FILE}").drop(columns=["version", "list_id"])
    log = warehouse.read_parquet(f"{folder}/{DECISION_LOG_FILE}")
    log = log.drop(columns=["version", "list_id", "tracking_tokens"])
    return lists, log.sort_values("subject_id", ignore_index=True)


@pytest.mark.parametrize("shards", [1, 3])
def test_a_partition_published_part_by_part_is_the_version_published_whole(
    tmp_path: Any, shards: int
) -> None:
    streamed, whole = Warehouse(str(tmp_path / "streamed")), Warehouse(str(tmp_path / "whole"))
    slates = _stage(streamed, shards=shards)
    _stage(whole, shards=1)
    outcome = publish_partition(
        streamed, CONFIG, SURFACE, REGION, now=later(1), tracking_secret="s"
    )
    config = CONFIG.surface(SURFACE)
    reference = publish_version(
        whole,
        CONFIG,
        SURFACE,
        REGION,
        lists_from_slates(
            slates,
            surface=config,
            region=REGION,
            ttl=config.ttl,
            source_data_snapshot=str(read_snapshot(streamed)["snapshot_id"]),
        ),
        items=make_items(60),
        subjects=make_subjects(9),
        now=later(1),
        tracking_secret="s",
    )

    assert outcome.published and reference.published, outcome.failures
    _assert_same(outcome.report, reference.report)
    for found, wanted in zip(
        _version_files(streamed, outcome.path), _version_files(whole, reference.path), strict=True
    ):
        pd.testing.assert_frame_equal(found, wanted)
    lists_file = pq.ParquetFile(streamed.path(f"{outcome.path}/{LISTS_FILE}"))
    assert lists_file.metadata.num_row_groups == shards  # a row group per slates part
    manifest = read_manifest(streamed, SURFACE, REGION)
    assert manifest is not None and manifest.active_version == outcome.version


def test_a_refused_streamed_version_leaves_the_manifest_untouched(tmp_path: Any) -> None:
    warehouse = Warehouse(str(tmp_path / "warehouse"))
    _stage(warehouse, shards=3)
    first = publish_partition(warehouse, CONFIG, SURFACE, REGION, now=later(1), tracking_secret="s")
    assert first.published, first.failures
    before = warehouse.read_bytes(manifest_path(SURFACE, REGION))
    _stage(warehouse, shards=3, banned=True)

    refused = publish_partition(
        warehouse, CONFIG, SURFACE, REGION, now=later(2), tracking_secret="s"
    )

    assert not refused.published
    assert "invalid_item_rate" in refused.report.failed_checks()
    assert warehouse.read_bytes(manifest_path(SURFACE, REGION)) == before


def test_parts_out_of_subject_order_are_refused_before_any_flip(local_warehouse: Warehouse) -> None:
    lists, items, subjects = make_lists(n_subjects=4)
    late, early = lists[lists["subject_id"] >= 102], lists[lists["subject_id"] < 102]
    with pytest.raises(ValueError, match="subject order"):
        publish_parts(
            local_warehouse, CONFIG, SURFACE, REGION, [late, early], items=items,
            subjects=subjects, now=later(1), tracking_secret="s",
        )  # fmt: skip
    assert read_manifest(local_warehouse, SURFACE, REGION) is None
