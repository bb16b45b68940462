"""Tombstones: policy changes that serving must honour at once, before any list is rebuilt.

Automation turns a policy-change file into `tombstones/<change_id>.parquet` (one row per
tombstone); serving reloads the folder and refuses what they name. A row says *what* is
withdrawn by the fields it sets:

- no `user_id`: items matching every set field among `item_id`, `creator_id`, `tenant_id`
  are withdrawn for everyone in `region` (null = every region);
- `user_id` with `item_id` or `creator_id`: that person must not be shown those items;
- `user_id` alone: that person gets no personalized list at all (consent revoked,
  account closed). A person's choices hold in every region, so `region` is ignored there.

A tombstone applies from `effective_at`; files are written atomically and never edited.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_assets.warehouse import PreconditionFailed, Warehouse

TOMBSTONES_PREFIX = "tombstones"
TOMBSTONE_COLUMNS: dict[str, str] = {
    "change_id": "str",
    "type": "str",
    "item_id": "Int64",
    "user_id": "Int64",
    "creator_id": "str",
    "tenant_id": "str",
    "region": "str",
    "effective_at": "datetime64[ns]",
    "created_at": "datetime64[ns]",
}
_TARGETS = ("item_id", "user_id", "creator_id", "tenant_id")
_CHANGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]{0,199}$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def tombstone_path(change_id: str) -> str:
    if not _CHANGE_ID.match(change_id):
        raise ValueError(
            f"change_id {change_id!r} cannot name a tombstone file: use letters, digits "
            "and _ . = - (at most 200 characters)"
        )
    return f"{TOMBSTONES_PREFIX}/{change_id}.parquet"


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    typed = pd.DataFrame(index=frame.index)
    for column, dtype in TOMBSTONE_COLUMNS.items():
        values = frame[column] if column in frame else pd.Series(None, index=frame.index)
        if dtype == "str":
            typed[column] = values.astype("str")
        elif dtype == "Int64":
            typed[column] = pd.to_numeric(values, errors="raise").astype("Int64")
        else:
            stamps = pd.to_datetime(values)
            if getattr(stamps.dt, "tz", None) is not None:
                stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
            typed[column] = stamps.astype("datetime64[ns]")
    return typed.reset_index(drop=True)


def empty_tombstones() -> pd.DataFrame:
    return _typed(pd.DataFrame({column: [] for column in TOMBSTONE_COLUMNS}))


def write_tombstones(
    warehouse: Warehouse,
    change_id: str,
    tombstones: pd.DataFrame | Iterable[Mapping[str, Any]],
    *,
    created_at: datetime | None = None,
) -> str:
    """Write one policy change's tombstones; returns the warehouse path.

    Idempotent per change: a change already written is left as it is (a retried sensor
    tick must not edit what serving may already have honoured).
    """
    frame = tombstones if isinstance(tombstones, pd.DataFrame) else pd.DataFrame(list(tombstones))
    if frame.empty:
        raise ValueError(f"policy change {change_id!r}: no tombstones to write")
    unknown = set(frame.columns) - set(TOMBSTONE_COLUMNS)
    if unknown:
        raise ValueError(
            f"policy change {change_id!r}: unknown tombstone columns {sorted(unknown)}; "
            f"expected {list(TOMBSTONE_COLUMNS)}"
        )
    if "type" not in frame or frame["type"].isna().any():
        raise ValueError(f"policy change {change_id!r}: every tombstone needs a type")
    for column in ("item_id", "user_id"):
        out_of_range = [
            value
            for value in (frame[column].dropna() if column in frame else [])
            if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX
        ]
        if out_of_range:  # int64 storage: such an id names nothing and would overflow
            raise ValueError(
                f"policy change {change_id!r}: {column} {out_of_range[:5]} out of the int64 range"
            )
    present = [column for column in _TARGETS if column in frame]
    untargeted = frame[present].isna().all(axis=1) if present else pd.Series(True, frame.index)
    if untargeted.any():
        rows = list(frame.index[untargeted.to_numpy()][:5])
        raise ValueError(
            f"policy change {change_id!r}: rows {rows} name no item_id, user_id, creator_id "
            "or tenant_id, so they would withdraw nothing"
        )
    stamp = pd.Timestamp(created_at or datetime.now(UTC).replace(tzinfo=None))
    frame = frame.assign(change_id=change_id, created_at=stamp)
    if "effective_at" not in frame:
        frame["effective_at"] = stamp
    frame["effective_at"] = frame["effective_at"].fillna(stamp)
    path = tombstone_path(change_id)
    typed = _typed(frame)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(typed, preserve_index=False), buffer)
    with contextlib.suppress(PreconditionFailed):  # already written: never edit a change
        warehouse.write_bytes_if(path, buffer.getvalue(), expected_etag=None)
    return path


def tombstone_files(warehouse: Warehouse) -> list[str]:
    """Warehouse paths of every tombstone file, sorted."""
    return warehouse.list(TOMBSTONES_PREFIX, suffix=".parquet")


def load_tombstones(warehouse: Warehouse, files: list[str] | None = None) -> pd.DataFrame:
    """Every tombstone (or those in `files`), typed as TOMBSTONE_COLUMNS."""
    names = tombstone_files(warehouse) if files is None else files
    frames = [_typed(warehouse.read_parquet(name)) for name in names]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return empty_tombstones()
    return pd.concat(frames, ignore_index=True)


def _in_effect(tombstones: pd.DataFrame, now: datetime) -> pd.DataFrame:
    return tombstones[tombstones["effective_at"] <= pd.Timestamp(now)]


def next_effective_at(tombstones: pd.DataFrame, now: datetime) -> datetime | None:
    """When the next not-yet-effective tombstone starts to apply, if any."""
    pending = tombstones.loc[tombstones["effective_at"] > pd.Timestamp(now), "effective_at"]
    return None if pending.empty else pending.min().to_pydatetime()


def tombstoned_items(
    tombstones: pd.DataFrame, items: pd.DataFrame, *, region: str, now: datetime
) -> np.ndarray:
    """Mask over `items` rows withdrawn for everyone in `region` at `now`."""
    rows = _in_effect(tombstones, now)
    rows = rows[rows["user_id"].isna() & (rows["region"].isna() | (rows["region"] == region))]
    withdrawn = np.zeros(len(items), dtype=bool)
    if rows.empty:
        return withdrawn
    item_ids = items["item_id"].to_numpy(dtype=np.int64)
    creators = items["creator_id"].astype(object).to_numpy()
    tenants = items["tenant_id"].astype(object).to_numpy()
    by_item = rows["item_id"].notna() & rows["creator_id"].isna() & rows["tenant_id"].isna()
    withdrawn |= np.isin(item_ids, rows.loc[by_item, "item_id"].to_numpy(dtype=np.int64))
    for row in rows[~by_item].itertuples(index=False):
        match = np.ones(len(items), dtype=bool)
        if not pd.isna(row.item_id):
            match &= item_ids == int(row.item_id)
        if not pd.isna(row.creator_id):
            match &= creators == row.creator_id
        if not pd.isna(row.tenant_id):
            match &= tenants == row.tenant_id
        withdrawn |= match
    return withdrawn


@dataclass
class PersonTombstones:
    """Tombstones scoped to one person each."""

    no_personalization: set[int] = field(default_factory=set)
    items: dict[int, set[int]] = field(default_factory=dict)
    creators: dict[int, set[str]] = field(default_factory=dict)


def person_tombstones(tombstones: pd.DataFrame, *, now: datetime) -> PersonTombstones:
    """Tombstones naming a user_id, in effect at `now`, indexed by person."""
    rows = _in_effect(tombstones, now)
    rows = rows[rows["user_id"].notna()]
    found = PersonTombstones()
    for row in rows.itertuples(index=False):
        user = int(row.user_id)
        has_item = not pd.isna(row.item_id)
        has_creator = not pd.isna(row.creator_id)
        if has_item:
            found.items.setdefault(user, set()).add(int(row.item_id))
        if has_creator:
            found.creators.setdefault(user, set()).add(str(row.creator_id))
        if not has_item and not has_creator:
            found.no_personalization.add(user)
    return found


def tombstoned_list_rows(
    rows: pd.DataFrame,
    items: pd.DataFrame,
    tombstones: pd.DataFrame,
    *,
    region: str,
    now: datetime,
) -> np.ndarray:
    """Mask over (subject_id, item_id) rows withdrawn by a tombstone for everyone in `region`
    or for that subject; the batch-side twin of serving's tombstone check."""
    known = items.drop_duplicates("item_id")
    withdrawn_items = known.loc[
        tombstoned_items(tombstones, known, region=region, now=now), "item_id"
    ]
    mask = rows["item_id"].isin(withdrawn_items).to_numpy()
    person = person_tombstones(tombstones, now=now)
    if person.items or person.creators or person.no_personalization:
        creators = rows["item_id"].map(known.set_index("item_id")["creator_id"]).astype(object)
        for position, (subject, item, creator) in enumerate(
            zip(rows["subject_id"], rows["item_id"], creators, strict=True)
        ):
            subject = int(subject)
            if (
                subject in person.no_personalization
                or item in person.items.get(subject, ())
                or creator in person.creators.get(subject, ())
            ):
                mask[position] = True
    return mask
