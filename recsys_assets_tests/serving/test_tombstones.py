"""Tombstone files: written once per change, read back typed, interpreted by scope."""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd
import pytest

from recsys_assets.rules.tombstones import (
    load_tombstones,
    next_effective_at,
    person_tombstones,
    tombstoned_items,
    write_tombstones,
)
from recsys_assets.warehouse import Warehouse

NOW = datetime(2026, 11, 20, 12)


def test_write_is_idempotent_and_load_is_typed(warehouse: Warehouse) -> None:
    rows = [
        {"type": "item_banned", "item_id": 7, "region": "na"},
        {"type": "consent_revoked", "user_id": 3},
        {"type": "creator_banned", "creator_id": "c9", "effective_at": NOW + timedelta(hours=1)},
    ]
    path = write_tombstones(warehouse, "change-1", rows, created_at=NOW)
    assert path == "tombstones/change-1.parquet"
    write_tombstones(warehouse, "change-1", [{"type": "item_banned", "item_id": 8}])
    loaded = load_tombstones(warehouse)
    assert loaded["item_id"].tolist()[:1] == [7] and len(loaded) == 3
    assert str(loaded["effective_at"].dtype) == "datetime64[ns]"
    assert next_effective_at(loaded, NOW) == NOW + timedelta(hours=1)

    items = pd.DataFrame(
        {"item_id": [7, 8, 9], "creator_id": ["c1", "c9", "c2"], "tenant_id": [None, None, None]}
    )
    assert tombstoned_items(loaded, items, region="na", now=NOW).tolist() == [True, False, False]
    assert tombstoned_items(loaded, items, region="eu", now=NOW).tolist() == [False, False, False]
    later = NOW + timedelta(hours=2)
    assert tombstoned_items(loaded, items, region="eu", now=later).tolist() == [False, True, False]
    assert person_tombstones(loaded, now=NOW).no_personalization == {3}


def test_a_tombstone_must_name_something(local_warehouse: Warehouse) -> None:
    with pytest.raises(ValueError, match="name no item_id"):
        write_tombstones(local_warehouse, "change-2", [{"type": "item_banned", "region": "na"}])
    with pytest.raises(ValueError, match="cannot name a tombstone file"):
        write_tombstones(local_warehouse, "../escape", [{"type": "x", "item_id": 1}])
