"""Synthetic seeding: valid, deterministic, streamed in parts, with learnable structure."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pandas as pd
import pytest

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.contracts import check_foreign_keys, validate_table
from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data import seed as seed_module
from recsys_assets.data.seed import seed_warehouse
from recsys_assets.rules.eligibility import item_rejection_reasons
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)


def _tables(warehouse: Warehouse) -> dict[str, pd.DataFrame]:
    return {table: read_raw(warehouse, table) for table in RAW_CONTRACTS}


def _assert_valid(tables: dict[str, pd.DataFrame], now: datetime) -> None:
    for table, frame in tables.items():
        validate_table(table, frame, now=now, regions=SETTINGS.regions)
    check_foreign_keys(tables, sources={})


def test_tiny_seed_is_valid_and_recorded(tiny_warehouse: Warehouse) -> None:
    tables = _tables(tiny_warehouse)
    _assert_valid(tables, TINY_AS_OF)
    snapshot = read_snapshot(tiny_warehouse)
    assert snapshot["source"] == "seed"
    assert (snapshot["scale"], snapshot["seed"]) == ("tiny", 1)
    assert snapshot["as_of"] == TINY_AS_OF.isoformat()
    assert snapshot["row_counts"] == {table: len(frame) for table, frame in tables.items()}
    assert len(tables["users"]) == 500 and len(tables["items"]) == 300


def test_tiny_seed_has_the_cases_the_final_checks_handle(tiny_warehouse: Warehouse) -> None:
    tables = _tables(tiny_warehouse)
    users, items, events = tables["users"], tables["items"], tables["interactions"]
    reasons = item_rejection_reasons(items, region="na", now=TINY_AS_OF).value_counts()
    for reason in ("not_approved", "inactive_or_deleted", "out_of_stock", "not_in_region"):
        assert reasons.get(reason, 0) > 0, reason
    sponsored = items[items["is_sponsored"]]
    assert (sponsored["campaign_end"] > TINY_AS_OF).any()
    assert (sponsored["campaign_end"] <= TINY_AS_OF).any()
    assert (items["created_at"] > TINY_AS_OF - timedelta(days=4)).any()
    cases = items[items["item_type"] == "case"]
    assert cases["tenant_id"].nunique() == 3
    assert {"open", "closed"} <= set(cases["case_state"])
    assert cases["required_role"].notna().any() and cases["required_role"].isna().any()
    actors = users[users["tenant_id"].notna()]
    assert actors["tenant_id"].nunique() == 3 and actors["actor_role"].notna().all()

    assert 0.75 < users["consent_personalization"].mean() < 0.95
    assert 0.45 < users["email_subscribed"].mean() < 0.75
    assert 0.25 < users["push_enabled"].mean() < 0.55
    assert (users["last_active_at"] < TINY_AS_OF - timedelta(days=90)).sum() > 10
    assert set(users["region"]) == set(SETTINGS.regions)
    assert events["ts"].min() >= TINY_AS_OF - timedelta(days=57)

    kinds = events["event_type"].value_counts()
    assert 0.2 < kinds["click"] / kinds["view"] < 0.4
    assert 0.02 < kinds["purchase"] / kinds["view"] < 0.08
    assert {"rating", "hide"} <= set(kinds.index)

    controls = tables["user_controls"]
    assert {"hide", "unhide"} <= set(controls["action"])
    assert set(tables["exposures"]["surface"]) <= set(SETTINGS.surfaces)
    editorial = tables["editorial"]
    assert set(editorial["region"]) == set(SETTINGS.regions)
    live = (editorial["valid_from"] <= TINY_AS_OF) & (editorial["valid_to"] > TINY_AS_OF)
    assert live.any() and (editorial["valid_to"] <= TINY_AS_OF).any()


def test_interactions_follow_user_tastes_and_power_law_popularity(
    tiny_warehouse: Warehouse,
) -> None:
    items = read_raw(tiny_warehouse, "items", columns=["item_id", "category"])
    events = read_raw(tiny_warehouse, "interactions").merge(items, on="item_id")
    # A user's favourite category is far more common in their history than overall.
    overall = events["category"].value_counts(normalize=True)
    per_user = events.groupby("user_id")["category"]
    favourite = per_user.agg(lambda categories: categories.value_counts().index[0])
    share = per_user.agg(lambda categories: categories.value_counts(normalize=True).iloc[0])
    lift = (share / favourite.map(overall))[per_user.size() >= 20]
    assert lift.median() > 2.0

    popularity = events["item_id"].value_counts()
    top_tenth = popularity.iloc[: max(1, len(popularity) // 10)].sum()
    assert top_tenth / popularity.sum() > 0.3


def test_same_seed_gives_identical_tables_and_another_seed_differs(tmp_path) -> None:
    frames = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        warehouse = Warehouse((tmp_path / name).as_uri())
        seed_warehouse(warehouse, scale="tiny", seed=seed, settings=SETTINGS, as_of=TINY_AS_OF)
        frames.append(_tables(warehouse))
    first, again, other = frames
    for table in RAW_CONTRACTS:
        pd.testing.assert_frame_equal(first[table], again[table])
    assert not first["interactions"].equals(other["interactions"])
    assert not first["users"].equals(other["users"])


def test_large_style_chunking_writes_parts_and_replaces_stale_ones(
    local_warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunked = replace(seed_module.SCALES["tiny"], user_chunk=200)
    monkeypatch.setitem(seed_module.SCALES, "tiny", chunked)
    report = seed_warehouse(
        local_warehouse, scale="tiny", seed=2, settings=SETTINGS, as_of=TINY_AS_OF
    )
    assert report.parts["users"] == report.parts["interactions"] == 3
    assert len(local_warehouse.list("raw/interactions", suffix=".parquet")) == 3
    tables = _tables(local_warehouse)
    _assert_valid(tables, TINY_AS_OF)
    assert tables["users"]["user_id"].tolist() == list(range(1, 501))

    monkeypatch.setitem(seed_module.SCALES, "tiny", replace(chunked, user_chunk=50_000))
    seed_warehouse(local_warehouse, scale="tiny", seed=2, settings=SETTINGS, as_of=TINY_AS_OF)
    assert local_warehouse.list("raw/interactions", suffix=".parquet") == [
        "raw/interactions/part-00000.parquet"
    ]
    assert read_snapshot(local_warehouse)["row_counts"]["users"] == 500


def test_seed_into_s3_warehouse_is_valid(s3_warehouse: Warehouse) -> None:
    report = seed_warehouse(s3_warehouse, scale="tiny", seed=1, settings=SETTINGS, as_of=TINY_AS_OF)
    tables = _tables(s3_warehouse)
    _assert_valid(tables, TINY_AS_OF)
    assert {table: len(frame) for table, frame in tables.items()} == report.row_counts
    assert read_snapshot(s3_warehouse)["snapshot_id"] == report.snapshot_id


def test_unknown_scale_is_refused(local_warehouse: Warehouse) -> None:
    with pytest.raises(ValueError, match="unknown scale 'huge'"):
        seed_warehouse(local_warehouse, scale="huge", seed=1, settings=SETTINGS)
    assert not local_warehouse.exists("raw")
