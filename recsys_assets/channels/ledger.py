"""The sends ledger: one row per (sent message, item), the history every channel rule reads.

Written by the sender after a message is handed over (`channels/sends/surface=S/region=R/
date=D/<uuid>.parquet`), read by the send cap and duplicate check of the next plan, by the
sender's idempotency check and by attribution (tracking token → send).
"""

from __future__ import annotations

import uuid
from datetime import date

import pandas as pd

from recsys_assets.warehouse import Warehouse, partition_path

SENDS_PREFIX = "channels/sends"
PLANS_PREFIX = "channels/send_plans"
"""Where send_plans writes each partition's plan (plans.py); here so serving can read the
plans' skip counts without importing the planner."""
SEND_SCHEMA: dict[str, str] = {
    "send_key": "str",
    "subject_id": "int64",
    "surface": "str",
    "medium": "str",
    "region": "str",
    "send_date": "str",
    "send_at": "datetime64[ns]",
    "handed_over_at": "datetime64[ns]",
    "list_id": "str",
    "version": "str",
    "model_version": "str",
    "item_id": "int64",
    "position": "int32",
    "tracking_token": "str",
    "message_path": "str",
}
"""Columns of a ledger file (docs/CHANNELS.md, "Sends ledger")."""


def send_key(surface: str, subject_id: int, send_date: date | str) -> str:
    """The idempotency key of a send: one message per (channel, subject, UTC send date)."""
    day = send_date if isinstance(send_date, str) else send_date.isoformat()
    return f"{surface}/{int(subject_id)}/{day}"


def empty_sends() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in SEND_SCHEMA.items()})


def sends_root(surface: str, region: str) -> str:
    return f"{SENDS_PREFIX}/{partition_path(surface=surface, region=region)}"


def ledger_files(warehouse: Warehouse, *, surface: str, region: str) -> list[str]:
    """Every ledger file of one channel partition, oldest day first."""
    root = sends_root(surface, region)
    found: list[str] = []
    for folder in warehouse.list_dirs(root):
        found.extend(warehouse.list(f"{root}/{folder}", suffix=".parquet"))
    return found


def all_ledger_files(warehouse: Warehouse) -> list[str]:
    """Every ledger file of every channel partition (attribution looks tokens up in all)."""
    found: list[str] = []
    for surface in warehouse.list_dirs(SENDS_PREFIX):
        for region in warehouse.list_dirs(f"{SENDS_PREFIX}/{surface}"):
            root = f"{SENDS_PREFIX}/{surface}/{region}"
            for folder in warehouse.list_dirs(root):
                found.extend(warehouse.list(f"{root}/{folder}", suffix=".parquet"))
    return found


def read_ledger_files(warehouse: Warehouse, files: list[str]) -> pd.DataFrame:
    frames = [warehouse.read_parquet(name) for name in files]
    if not frames:
        return empty_sends()
    return pd.concat(frames, ignore_index=True)


def read_sends(warehouse: Warehouse, *, surface: str, region: str) -> pd.DataFrame:
    """The partition's sends history, one row per (send, item)."""
    return read_ledger_files(warehouse, ledger_files(warehouse, surface=surface, region=region))


def append_sends(warehouse: Warehouse, rows: pd.DataFrame, *, handed_over_at: pd.Timestamp) -> str:
    """Write `rows` (SEND_SCHEMA columns) as one new ledger file; returns its path."""
    surface, region = str(rows["surface"].iloc[0]), str(rows["region"].iloc[0])
    path = (
        f"{sends_root(surface, region)}/date={handed_over_at.date().isoformat()}/"
        f"{uuid.uuid4().hex}.parquet"
    )
    frame = rows[list(SEND_SCHEMA)].astype(SEND_SCHEMA)
    warehouse.write_parquet(path, frame)
    return path
