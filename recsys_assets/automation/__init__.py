"""Automation: policy-change sensor, list-expiry sensor, schedules, backfill helpers.

`SENSORS` and `SCHEDULES` are resolved on first use: the plain modules (policy_changes,
inbox, refresh, backfills) stay importable without loading the asset graph and torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SCHEDULES", "SENSORS"]


def __getattr__(name: str) -> Any:
    if name == "SENSORS":
        from recsys_assets.automation.sensors import SENSORS

        return SENSORS
    if name == "SCHEDULES":
        from recsys_assets.automation.schedules import SCHEDULES

        return SCHEDULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
