"""Fresh signals for the online rerank: what happened since a shortlist was generated.

Serving already records user actions as serving events (`serving/events/`, read and ordered
by `rules.person` like every other reader). The candidate-pool rerank needs them in another
shape than the final check does: per person, the engagements (`rules.person.CONSUMED_EVENTS`)
and exposures with their times, to update the ranker's inputs since generation; per region,
the items engaged with most in the last `overlay_window` (the trending overlay). `FreshSignals`
keeps the events of the last `horizon` for that, fed by this process's own events at once
(`record`) and by the files other replicas wrote at each poll (`sync`).

`FreshItems` is the catalog side: items by creation time (the new-items overlay) and by
creator (session neighbours), rebuilt when the raw snapshot changes.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys_assets.data.snapshot import read_raw
from recsys_assets.rules.person import CONSUMED_EVENTS, event_files, read_event_files
from recsys_assets.serving.state import ServingEvent, naive_utc_ns
from recsys_assets.warehouse import Warehouse

EXPOSURE = "exposure"
_ENGAGEMENTS = frozenset(CONSUMED_EVENTS)
_DAY_NS = 86_400 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class PersonEvent:
    """One engagement or exposure of a person: when, what, on which surface."""

    ts_ns: int
    type: str
    item_id: int
    surface: str | None


class FreshSignals:
    """Engagements and exposures of the last `horizon_ns`, by person and by region."""

    def __init__(
        self,
        warehouse: Warehouse,
        *,
        horizon_ns: int,
        trending_window_ns: int,
        trending_items: int,
        clock: Callable[[], int],
    ) -> None:
        self.warehouse = warehouse
        self.horizon_ns = horizon_ns
        self.trending_window_ns = trending_window_ns
        self.trending_items = trending_items
        self.clock = clock
        self._by_person: dict[int, list[PersonEvent]] = {}
        self._by_region: dict[str, deque[tuple[int, int]]] = {}
        self._trending: dict[str, dict[int, int]] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def person_events(self, user_id: int, since_ns: int) -> list[PersonEvent]:
        """The person's engagements and exposures strictly after `since_ns`."""
        return [event for event in self._by_person.get(user_id, ()) if event.ts_ns > since_ns]

    def trending(self, region: str) -> dict[int, int]:
        """Item id → engagements in `region` within the trending window, most first."""
        return self._trending.get(region, {})

    def sync(self) -> int:
        """Apply the event files not seen yet (other replicas'); returns the events applied."""
        now_ns = self.clock()
        since = pd.Timestamp(now_ns - self.horizon_ns, unit="ns").date()
        files = [
            name for name in event_files(self.warehouse, since=since) if name not in self._seen
        ]
        events, read = read_event_files(self.warehouse, files)
        with self._lock:
            self._seen.update(read)
            self._apply_frame(events)
            self._prune(now_ns)
        return len(events)

    def record(self, path: str, events: Iterable[ServingEvent]) -> None:
        """Apply events this process just stored at `path` (effective on the next request)."""
        now_ns = self.clock()
        with self._lock:
            self._seen.add(path)
            for event in events:
                if event.item_id is None:
                    continue
                ts_ns = naive_utc_ns(event.ts) if event.ts is not None else now_ns
                self._apply(
                    event.type, event.user_id, event.item_id, event.surface, event.region, ts_ns
                )
            self._prune(now_ns)

    def _apply_frame(self, events: pd.DataFrame) -> None:
        if events.empty:
            return
        useful = events[events["type"].isin([*_ENGAGEMENTS, EXPOSURE]) & events["item_id"].notna()]
        stamps = useful["ts"].astype("datetime64[ns]").to_numpy().view(np.int64).tolist()
        for row, ts_ns in zip(useful.itertuples(index=False), stamps, strict=True):
            self._apply(
                str(row.type),
                int(row.user_id),
                int(row.item_id),
                None if pd.isna(row.surface) else str(row.surface),
                None if pd.isna(row.region) else str(row.region),
                ts_ns,
            )

    def _apply(
        self,
        event_type: str,
        user_id: int,
        item_id: int,
        surface: str | None,
        region: str | None,
        ts_ns: int,
    ) -> None:
        if event_type not in _ENGAGEMENTS and event_type != EXPOSURE:
            return
        self._by_person.setdefault(user_id, []).append(
            PersonEvent(ts_ns, event_type, item_id, surface)
        )
        if event_type in _ENGAGEMENTS and region is not None:
            self._by_region.setdefault(region, deque()).append((ts_ns, item_id))

    def _prune(self, now_ns: int) -> None:
        """Drop what fell out of the horizon and recount each region's trending items."""
        oldest = now_ns - self.horizon_ns
        for user_id in [u for u, kept in self._by_person.items() if kept[0].ts_ns <= oldest]:
            kept = [event for event in self._by_person[user_id] if event.ts_ns > oldest]
            if kept:
                self._by_person[user_id] = kept
            else:
                del self._by_person[user_id]
        window_start = now_ns - self.trending_window_ns
        for region, events in self._by_region.items():
            while events and events[0][0] <= window_start:
                events.popleft()
            counts = Counter(item_id for _, item_id in events)
            self._trending[region] = dict(counts.most_common(self.trending_items))


@dataclass(frozen=True)
class FreshItems:
    """Catalog items by creation time and by creator, from one raw snapshot."""

    snapshot_id: str | None
    created_ns: np.ndarray
    """Creation times, ascending; `by_creation` holds the item ids in that order."""
    by_creation: np.ndarray
    creator_items: dict[str, np.ndarray]
    """Creator → its item ids, newest first."""
    item_ids: np.ndarray
    """Every item id, ascending; `created_at_ns`, `stock` and `sponsored` follow it."""
    created_at_ns: np.ndarray
    stock: np.ndarray
    sponsored: np.ndarray

    @classmethod
    def load(cls, warehouse: Warehouse, snapshot_id: str | None) -> FreshItems:
        items = read_raw(
            warehouse,
            "items",
            columns=["item_id", "creator_id", "is_sponsored", "stock", "created_at"],
        )
        created = items["created_at"].astype("datetime64[ns]").to_numpy().view(np.int64)
        order = np.argsort(created, kind="stable")
        item_ids = items["item_id"].to_numpy(dtype=np.int64)
        newest_first = items.iloc[order[::-1]]
        creator_items = {
            str(creator): group.to_numpy(dtype=np.int64)
            for creator, group in newest_first.groupby("creator_id", sort=False)["item_id"]
        }
        by_id = np.argsort(item_ids, kind="stable")
        return cls(
            snapshot_id,
            created[order],
            item_ids[order],
            creator_items,
            item_ids[by_id],
            created[by_id],
            items["stock"].to_numpy(dtype=np.float32, na_value=0)[by_id],
            items["is_sponsored"].fillna(False).to_numpy(dtype=bool)[by_id],
        )

    def attributes(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(created_at ns, stock, sponsored) of catalog items (ids this snapshot holds)."""
        at = np.minimum(np.searchsorted(self.item_ids, item_ids), len(self.item_ids) - 1)
        return self.created_at_ns[at], self.stock[at], self.sponsored[at]

    def created_after(self, moment_ns: int, count: int) -> np.ndarray:
        """Up to `count` items created after `moment_ns`, newest first."""
        start = int(np.searchsorted(self.created_ns, moment_ns, side="right"))
        return self.by_creation[start:][::-1][:count]

    def neighbours(self, creators: Iterable[str], count: int) -> np.ndarray:
        """Up to `count` items of `creators` (session items' creators), newest first."""
        found = [self.creator_items[c] for c in creators if c in self.creator_items]
        if not found:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(found)[:count]
