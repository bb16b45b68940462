"""The serving decision log: every response, as small Parquet files partitioned by date.

`append` only puts the response on a deque (thread-safe, no lock, no I/O), so logging
costs a fill well under a microsecond. A background thread writes
`serving/decision_log/date=YYYY-MM-DD/<uuid>.parquet` every `flush_interval_s` or as soon as
`max_rows` responses wait; `close()` writes what is left. If the warehouse is down the
rows wait for the next flush, up to `max_pending` of them; beyond that the oldest are
dropped and counted, so a storage outage cannot exhaust memory. A record that cannot be
turned into a row (it should never happen: requests are validated first) is isolated and
dropped alone, so one bad record can never stop the log.

Rows are of two kinds (`kind`): `recommendation`, one per response, with its serving mode
and experiment arm; and the kill switch's audit trail, `kill` / `lift`, saying who
(`actor`), what (`surface`, `region`, and the campaign in `context`), why (`reason` in
`context`) and when (`ts`).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from recsys_assets.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys_assets.serving.experiments import Assignment
    from recsys_assets.serving.kills import KillScope
    from recsys_assets.serving.service import Recommendation

log = logging.getLogger(__name__)

DECISION_LOG_PREFIX = "serving/decision_log"
_DAY_NS = 86_400 * 1_000_000_000

DECISION_LOG_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("ns")),
        ("request_id", pa.string()),
        ("subject_id", pa.int64()),
        ("surface", pa.string()),
        ("region", pa.string()),
        ("served_from", pa.string()),
        ("list_id", pa.string()),
        ("version", pa.string()),
        ("model_version", pa.string()),
        ("generated_at", pa.string()),
        ("expires_at", pa.string()),
        ("item_ids", pa.list_(pa.int64())),
        ("rejections", pa.string()),
        ("fallback_cause", pa.string()),
        ("requested_limit", pa.int64()),
        ("context", pa.string()),
        ("latency_us", pa.float64()),
        ("kind", pa.string()),
        ("serving_mode", pa.string()),
        ("experiment_id", pa.string()),
        ("experiment_arm", pa.string()),
        ("actor", pa.string()),
    ]
)
RECOMMENDATION = "recommendation"


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One response plus what the response itself does not say."""

    ts_ns: int
    recommendation: Recommendation
    fallback_cause: str | None
    requested_limit: int | None
    context: dict[str, Any] | None
    latency_us: float
    serving_mode: str | None = None
    assignment: Assignment | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A kill or a lift of the kill switch: who, which scope, why, when."""

    ts_ns: int
    action: str
    scope: KillScope
    actor: str
    reason: str | None


def records_table(records: list[DecisionRecord | AuditRecord]) -> pa.Table:
    """The decision-log rows of `records`, in DECISION_LOG_SCHEMA."""
    decisions = [record for record in records if isinstance(record, DecisionRecord)]
    audits = [record for record in records if isinstance(record, AuditRecord)]
    if not audits:
        return _decisions_table(decisions)
    return pa.concat_tables([_decisions_table(decisions), _audit_table(audits)])


def _audit_table(records: list[AuditRecord]) -> pa.Table:
    rows = [
        {
            "ts": record.ts_ns,
            "request_id": f"{record.action}-{uuid.uuid4().hex}",
            "surface": record.scope.surface,
            "region": record.scope.region,
            "context": json.dumps(
                {"campaign": record.scope.campaign, "reason": record.reason}, sort_keys=True
            ),
            "kind": record.action,
            "actor": record.actor,
        }
        for record in records
    ]
    return pa.Table.from_pylist(rows, schema=DECISION_LOG_SCHEMA)


def _decisions_table(records: list[DecisionRecord]) -> pa.Table:
    responses = [record.recommendation for record in records]
    assignments = [record.assignment for record in records]
    columns = {
        "ts": [record.ts_ns for record in records],
        "request_id": [r.request_id for r in responses],
        "subject_id": [r.subject_id for r in responses],
        "surface": [r.surface for r in responses],
        "region": [r.region for r in responses],
        "served_from": [r.served_from for r in responses],
        "list_id": [r.list_id for r in responses],
        "version": [r.version for r in responses],
        "model_version": [r.model_version for r in responses],
        "generated_at": [r.generated_at for r in responses],
        "expires_at": [r.expires_at for r in responses],
        "item_ids": [[item["item_id"] for item in r.items] for r in responses],
        "rejections": [json.dumps(r.rejections, sort_keys=True) for r in responses],
        "fallback_cause": [record.fallback_cause for record in records],
        "requested_limit": [record.requested_limit for record in records],
        "context": [
            json.dumps(record.context, sort_keys=True, default=str) if record.context else None
            for record in records
        ],
        "latency_us": [record.latency_us for record in records],
        "kind": [RECOMMENDATION] * len(records),
        "serving_mode": [record.serving_mode for record in records],
        "experiment_id": [a.experiment_id if a is not None else None for a in assignments],
        "experiment_arm": [a.arm if a is not None else None for a in assignments],
        "actor": [None] * len(records),
    }
    return pa.Table.from_pydict(columns, schema=DECISION_LOG_SCHEMA)


class DecisionLog:
    """Buffered, date-partitioned writer of serving decisions."""

    def __init__(
        self,
        warehouse: Warehouse,
        *,
        flush_interval_s: float = 5.0,
        max_rows: int = 20_000,
        max_pending: int = 1_000_000,
    ) -> None:
        self.warehouse = warehouse
        self.flush_interval_s = flush_interval_s
        self.max_rows = max_rows
        self.max_pending = max_pending
        self.dropped = 0
        self.written = 0
        self.write_failures = 0
        self.rejected = 0
        self._pending: deque[DecisionRecord | AuditRecord] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, record: DecisionRecord | AuditRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= self.max_rows:
            self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="decision-log-writer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write every waiting record now; returns how many were written."""
        with self._flush_lock:
            batch: list[DecisionRecord | AuditRecord] = []
            while self._pending:
                try:
                    batch.append(self._pending.popleft())
                except IndexError:
                    break
            if not batch:
                return 0
            by_day: dict[int, list[DecisionRecord | AuditRecord]] = {}
            for record in batch:
                by_day.setdefault(record.ts_ns // _DAY_NS, []).append(record)
            written = 0
            for day, records in sorted(by_day.items()):
                date = str(pa.scalar(day * _DAY_NS, pa.timestamp("ns")).as_py().date())
                path = f"{DECISION_LOG_PREFIX}/date={date}/{uuid.uuid4().hex}.parquet"
                table = self._convertible(records)
                if table is None:
                    continue
                try:
                    self.warehouse.write_parquet(path, table)
                    written += table.num_rows
                except Exception as error:  # storage: keep the rows for the next flush
                    self.write_failures += 1
                    log.warning("decision log: cannot write %s: %s", path, error)
                    self._pending.extendleft(reversed(records))
            overflow = len(self._pending) - self.max_pending
            for _ in range(max(overflow, 0)):
                self._pending.popleft()
                self.dropped += 1
            self.written += written
            return written

    def _convertible(self, records: list[DecisionRecord | AuditRecord]) -> pa.Table | None:
        """The rows of `records` that convert; a record that cannot is isolated by halving
        the batch, logged, counted in `rejected` and dropped, so it cannot wedge the log."""
        try:
            return records_table(records)
        except Exception as error:
            if len(records) == 1:
                self.rejected += 1
                record = records[0]
                log.error(
                    "decision log: dropping unwritable record %s: %s",
                    record.recommendation.request_id
                    if isinstance(record, DecisionRecord)
                    else f"{record.action} of {record.scope.describe()}",
                    error,
                )
                return None
        middle = len(records) // 2
        parts = [self._convertible(records[:middle]), self._convertible(records[middle:])]
        tables = [part for part in parts if part is not None]
        return pa.concat_tables(tables) if tables else None

    def close(self) -> None:
        """Stop the writer thread and write what is left."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()
