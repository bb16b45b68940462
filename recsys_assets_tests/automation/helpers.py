"""Builders for automation tests: policy-change lines, manifests, a users table."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from recsys_assets.automation.inbox import INCOMING
from recsys_assets.publish.versions import manifest_path
from recsys_assets.warehouse import Warehouse

NOW = datetime(2026, 11, 20, 12, 0, 0)


def change(change_id: str, change_type: str = "item_banned", **fields: Any) -> dict[str, Any]:
    """One policy change; defaults to banning item 7 everywhere, effective an hour ago."""
    record: dict[str, Any] = {
        "change_id": change_id,
        "type": change_type,
        "effective_at": (NOW - timedelta(hours=1)).isoformat() + "Z",
    }
    if change_type in {"item_banned", "item_deleted", "price_changed"} and "item_ids" not in fields:
        record["item_ids"] = [7]
    record.update(fields)
    return record


def drop_file(warehouse: Warehouse, name: str, *lines: dict[str, Any] | str) -> str:
    """Put a JSON Lines file into policy_changes/incoming/; returns its warehouse path."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path = f"{INCOMING}/{name}"
    warehouse.write_bytes(path, (text + "\n").encode())
    return path


def write_manifest(
    warehouse: Warehouse,
    surface: str,
    region: str,
    *,
    generated_at: datetime,
    expires_at: datetime,
    version: str = "v20261120T000000000000",
    fallback: bool = False,
) -> None:
    """A manifest as publish writes it (docs/DATA_MODEL.md), enough for automation."""
    warehouse.write_json(
        manifest_path(surface, region, fallback=fallback),
        {
            "surface": surface,
            "region": region,
            "active_version": version,
            "active_path": f"published/surface={surface}/region={region}/versions/{version}",
            "generated_at": generated_at.isoformat(),
            "expires_at": expires_at.isoformat(),
            "lineage": {},
            "validation": {"passed": True, "metrics": {}, "failures": []},
            "updated_at": generated_at.isoformat(),
            "history": [],
        },
    )


def write_users(warehouse: Warehouse, last_active: dict[int, tuple[str, datetime]]) -> None:
    """A raw users table (and snapshot marker): user_id → (region, last_active_at).

    Everyone consents to everything, so each user is a subject of every consumer surface.
    """
    ids = list(last_active)
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(ids, dtype="int64"),
            "region": [last_active[i][0] for i in ids],
            "locale": "en-US",
            "tenant_id": pd.Series([None] * len(ids), dtype="str"),
            "actor_role": pd.Series([None] * len(ids), dtype="str"),
            "consent_personalization": True,
            "email_subscribed": True,
            "push_enabled": True,
            "timezone": "UTC",
            "quiet_hours_start": 22,
            "quiet_hours_end": 7,
            "created_at": pd.Timestamp("2026-01-01"),
            "last_active_at": pd.to_datetime([last_active[i][1] for i in ids]),
        }
    )
    warehouse.write_parquet("raw/users/part-00000.parquet", frame)
    warehouse.write_json("raw/_snapshot.json", {"snapshot_id": "snap_test"})
