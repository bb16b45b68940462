"""Send plans: for each subject of an email, push or digest partition, send or skip.

A published list is a proposal; whether a message goes out is decided per subject at its
scheduled send time (publish's `scheduled_send_at`), each rule from the surface's
`channel_rules` with its own skip reason, in this order (the first that fails is logged):

1. **Subscribed**: the surface's person requirements (`rules.person`: consent plus
   `email_subscribed` / `push_enabled`) on the latest raw users with consent events
   applied, and user tombstones as serving honours them. Unknown subject: skipped.
2. **Quiet hours** (`quiet_hours`): a send in the subject's local quiet hours is deferred
   to their end (`quiet_hours_mode: defer`) or skipped (`skip`).
3. **Never stale**: a list that expires before the send time is never sent.
4. **Send cap** (`max_sends` per `send_cap_window`) over the sends ledger; a list already
   sent is `already_sent`.
5. **Items at send time**: serving's final check (`serving.final_check` on the same
   `OnlineState`, so campaign end, stock, tombstones, hides, consumed and the item
   frequency cap are judged as serving would at that instant), then `blocked_risk_levels`,
   then `min_relevance` on the calibrated probability; nothing left → skipped with the
   stage that emptied it.
6. **First slot** (`first_slot_min_relevance`): the message opens with its most confident
   item, which must reach the threshold, else it is not sent.

Every send and every skip becomes a decision-log row; sends also a plan row with the items
(at most `display_count`), their list positions and publish's tracking tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from recsys_assets.channels.digest import DEFAULT_LOCALE, DIGEST_TEMPLATE_VERSION, is_digest
from recsys_assets.channels.ledger import PLANS_PREFIX, read_sends
from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.data.snapshot import read_raw
from recsys_assets.publish.lists import is_messaging_surface
from recsys_assets.publish.manifest import read_manifest
from recsys_assets.rules.eligibility import REASON_BY_CODE
from recsys_assets.rules.person import (
    CONSENT,
    EMAIL,
    PUSH,
    PersonFacts,
    in_quiet_hours,
    known_timezone,
    person_requirements,
    read_person_facts,
)
from recsys_assets.serving.final_check import final_reason_codes
from recsys_assets.serving.state import OnlineState, naive_utc_ns
from recsys_assets.warehouse import Warehouse, partition_path

SEND = "send"
SKIP = "skip"

# Partition status
PLANNED = "planned"
NOT_A_CHANNEL = "not_a_channel"
NO_PUBLISHED_LIST = "no_published_list"

# Skip reasons, in rule order
UNKNOWN_SUBJECT = "unknown_subject"
NOT_SUBSCRIBED = {CONSENT: "consent_revoked", EMAIL: "email_unsubscribed", PUSH: "push_disabled"}
QUIET_HOURS = "quiet_hours"
STALE_LIST = "stale_list"
ALREADY_SENT = "already_sent"
SEND_CAP = "send_cap"
NO_ELIGIBLE_ITEM = "no_eligible_item"
RISK_LEVEL_BLOCKED = "risk_level_blocked"
BELOW_RELEVANCE = "below_min_relevance"
NO_HIGH_CONFIDENCE_ITEM = "no_high_confidence_item"
SKIP_REASONS = (
    UNKNOWN_SUBJECT,
    *NOT_SUBSCRIBED.values(),
    QUIET_HOURS,
    STALE_LIST,
    ALREADY_SENT,
    SEND_CAP,
    NO_ELIGIBLE_ITEM,
    RISK_LEVEL_BLOCKED,
    BELOW_RELEVANCE,
    NO_HIGH_CONFIDENCE_ITEM,
)

PLAN_COLUMNS = [
    "subject_id", "surface", "medium", "region", "list_id", "version", "model_version",
    "send_at", "send_at_local", "timezone", "item_ids", "positions", "tracking_tokens",
    "planned_at", "locale", "template_version",
]  # fmt: skip
"""plan.parquet: one row per message to send; item columns `|`-joined, in message order."""
DECISION_COLUMNS = [
    "subject_id", "surface", "region", "list_id", "version", "model_version",
    "scheduled_send_at", "send_at", "decision", "reason", "item_count", "item_rejections",
    "planned_at", "template_version",
]  # fmt: skip
"""decision_log.parquet: one row per subject of the list, sent or skipped, with why."""


def channel_medium(surface: SurfaceConfig) -> str | None:
    """`push`, `email`, or None for a surface that is not a channel (no send time, or no
    subscription flag to honour)."""
    if not is_messaging_surface(surface):
        return None
    required = person_requirements(surface)
    if PUSH in required:
        return "push"
    if EMAIL in required:
        return "email"
    return None


def plan_root(surface: str, region: str) -> str:
    return f"{PLANS_PREFIX}/{partition_path(surface=surface, region=region)}"


@dataclass(frozen=True)
class SendPlan:
    """One partition's plan: the messages to send and the decision per subject."""

    surface: str
    region: str
    status: str
    planned_at: pd.Timestamp
    plan: pd.DataFrame
    decisions: pd.DataFrame
    version: str | None = None
    model_version: str | None = None
    detail: str = ""

    @property
    def sends(self) -> int:
        return len(self.plan)

    def skips_by_reason(self) -> dict[str, int]:
        skipped = self.decisions[self.decisions["decision"] == SKIP]
        return {str(k): int(v) for k, v in skipped["reason"].value_counts().sort_index().items()}

    def summary(self) -> dict[str, object]:
        return {
            "surface": self.surface,
            "region": self.region,
            "status": self.status,
            "detail": self.detail,
            "planned_at": self.planned_at.isoformat(),
            "version": self.version,
            "model_version": self.model_version,
            "sends": self.sends,
            "skips": int((self.decisions["decision"] == SKIP).sum()),
            "skips_by_reason": self.skips_by_reason(),
        }


@dataclass(frozen=True)
class Recipient:
    """What the rules read about one subject at send time."""

    timezone: str
    quiet_start: int
    quiet_end: int
    locale: str = DEFAULT_LOCALE


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})


def quiet_hours_end(send_at: pd.Timestamp, recipient: Recipient) -> pd.Timestamp | None:
    """The first full hour at/after `send_at` outside the recipient's quiet hours (naive
    UTC), or None when `send_at` is not quiet. Stepping in UTC keeps DST unambiguous."""
    zone = known_timezone(recipient.timezone)
    local = send_at.tz_localize("UTC").tz_convert(zone)
    if not in_quiet_hours(local.hour, recipient.quiet_start, recipient.quiet_end):
        return None
    candidate = send_at.floor("h")
    for _ in range(25):
        candidate += pd.Timedelta(hours=1)
        hour = candidate.tz_localize("UTC").tz_convert(zone).hour
        if not in_quiet_hours(hour, recipient.quiet_start, recipient.quiet_end):
            return candidate
    return None  # quiet all day (start == end is never quiet, so unreachable)


def _local_iso(send_at: pd.Timestamp, timezone: str) -> str:
    return send_at.tz_localize("UTC").tz_convert(known_timezone(timezone)).isoformat()


class _SubjectRules:
    """The per-subject rules of one partition, with everything they read loaded once."""

    def __init__(
        self,
        surface: SurfaceConfig,
        region: str,
        *,
        facts: PersonFacts,
        state: OnlineState,
        recipients: dict[int, Recipient],
        risk_by_item: dict[int, str],
        sends: pd.DataFrame,
    ) -> None:
        self.surface = surface
        self.rules = surface.channel_rules
        self.region = region
        self.state = state
        self.recipients = recipients
        self.risk_by_item = risk_by_item
        users = facts.current_users.drop_duplicates("user_id").set_index("user_id")
        self.flags = {flag: users[flag].astype(bool) for flag in person_requirements(surface)}
        self.known = set(users.index.astype(np.int64).tolist())
        history = sends.drop_duplicates("send_key")
        self.sent_lists = set(history["list_id"].astype(str))
        self.sends_at: dict[int, list[pd.Timestamp]] = {}
        for subject_id, send_at in zip(history["subject_id"], history["send_at"], strict=True):
            self.sends_at.setdefault(int(subject_id), []).append(pd.Timestamp(send_at))

    def person_reason(self, subject_id: int) -> str | None:
        if subject_id not in self.known:
            return UNKNOWN_SUBJECT
        for flag, allowed in self.flags.items():
            if not bool(allowed.get(subject_id, False)):
                return NOT_SUBSCRIBED[flag]
        if subject_id in self.state.persons.no_personalization:  # a user tombstone
            return NOT_SUBSCRIBED[CONSENT]
        return None

    def send_time(self, subject_id: int, scheduled: pd.Timestamp) -> pd.Timestamp | None:
        """The send time after quiet hours (None: skipped for quiet hours)."""
        if not self.rules.quiet_hours:
            return scheduled
        recipient = self.recipients.get(subject_id, Recipient("UTC", 0, 0))
        deferred = quiet_hours_end(scheduled, recipient)
        if deferred is None:
            return scheduled
        return deferred if self.rules.quiet_hours_mode == "defer" else None

    def cap_reason(self, subject_id: int, list_id: str, send_at: pd.Timestamp) -> str | None:
        if list_id in self.sent_lists:
            return ALREADY_SENT
        if self.rules.max_sends == 0:
            return None
        window = pd.Timedelta(self.rules.send_cap_window)
        recent = [t for t in self.sends_at.get(subject_id, ()) if abs(t - send_at) < window]
        return SEND_CAP if len(recent) >= self.rules.max_sends else None

    def items(
        self, subject_id: int, rows: pd.DataFrame, send_at: pd.Timestamp
    ) -> tuple[pd.DataFrame, Counter[str], str | None]:
        """(the items to send in message order, rejections by reason, skip reason or None)."""
        item_ids = rows["item_id"].to_numpy(dtype=np.int64)
        catalog = self.state.catalog
        codes = final_reason_codes(
            item_ids,
            catalog.arrays.positions(item_ids),
            catalog=catalog,
            region=self.region,
            now_ns=naive_utc_ns(send_at),
            subject=self.state.subject(subject_id),
            filters=self.state.filters(subject_id, self.surface.name),
            frequency_cap=self.rules.frequency_cap_per_day,
        )
        rejected: Counter[str] = Counter(str(REASON_BY_CODE[c]) for c in codes if c)
        kept = rows[codes == 0]
        if kept.empty:
            return kept, rejected, NO_ELIGIBLE_ITEM
        if self.rules.blocked_risk_levels:
            risky = kept["item_id"].map(self.risk_by_item).isin(self.rules.blocked_risk_levels)
            rejected[RISK_LEVEL_BLOCKED] += int(risky.sum())
            kept = kept[~risky.to_numpy()]
            if kept.empty:
                return kept, rejected, RISK_LEVEL_BLOCKED
        if self.rules.min_relevance > 0:
            weak = ~(kept["calibrated"].astype(float) >= self.rules.min_relevance)
            rejected[BELOW_RELEVANCE] += int(weak.sum())
            kept = kept[~weak.to_numpy()]
            if kept.empty:
                return kept, rejected, BELOW_RELEVANCE
        threshold = self.rules.first_slot_min_relevance
        if threshold is not None:
            confidence = kept["calibrated"].astype(float).fillna(-1.0).to_numpy()
            best = int(np.argmax(confidence))
            if confidence[best] < threshold:
                return kept.iloc[:0], rejected, NO_HIGH_CONFIDENCE_ITEM
            kept = pd.concat([kept.iloc[[best]], kept.drop(kept.index[best])])
        return kept.head(self.surface.display_count), rejected, None


def _recipients(warehouse: Warehouse) -> dict[int, Recipient]:
    users = read_raw(
        warehouse,
        "users",
        columns=["user_id", "timezone", "quiet_hours_start", "quiet_hours_end", "locale"],
    ).drop_duplicates("user_id", keep="last")
    return {
        int(user_id): Recipient(str(zone), int(start), int(end), str(locale))
        for user_id, zone, start, end, locale in users.itertuples(index=False)
    }


def _tokens(decision_log: pd.DataFrame) -> dict[tuple[str, int], str]:
    """(list_id, item_id) → publish's tracking token, from the version's decision log."""
    found: dict[tuple[str, int], str] = {}
    for list_id, items, tokens in zip(
        decision_log["list_id"],
        decision_log["selected_item_ids"],
        decision_log["tracking_tokens"],
        strict=True,
    ):
        if not isinstance(tokens, str):
            continue
        for item_id, token in zip(str(items).split("|"), tokens.split("|"), strict=True):
            found[(str(list_id), int(item_id))] = token
    return found


def empty_plan(surface: str, region: str, status: str, now: pd.Timestamp, detail: str) -> SendPlan:
    return SendPlan(
        surface, region, status, now, _empty(PLAN_COLUMNS), _empty(DECISION_COLUMNS), detail=detail
    )


def plan_sends(
    warehouse: Warehouse, settings: Settings, surface_name: str, region: str, *, now: datetime
) -> SendPlan:
    """Decide, per subject of the partition's active list, send or skip at its send time."""
    planned_at = pd.Timestamp(now)
    surface = settings.surface(surface_name)
    settings.check_region(region)
    medium = channel_medium(surface)
    if medium is None:
        return empty_plan(
            surface_name,
            region,
            NOT_A_CHANNEL,
            planned_at,
            f"{surface_name} is not a channel: its channel_rules set no send_hour_local or "
            "quiet_hours, or it requires no email_subscribed / push_enabled",
        )
    manifest = read_manifest(warehouse, surface_name, region)
    if manifest is None:
        return empty_plan(
            surface_name,
            region,
            NO_PUBLISHED_LIST,
            planned_at,
            f"nothing is published for {surface_name}/{region}: run published_lists first",
        )
    lists = warehouse.read_parquet(f"{manifest.active_path}/lists.parquet")
    if "calibrated" not in lists.columns:  # published before lists stored the probability
        lists["calibrated"] = np.nan
    log = warehouse.read_parquet(f"{manifest.active_path}/decision_log.parquet")
    facts = read_person_facts(warehouse)
    if facts is None:
        raise FileNotFoundError(
            "cannot plan sends: the raw snapshot or its users / interactions / user_controls "
            "table is missing, so nobody's subscription can be judged"
        )
    state = OnlineState(warehouse, settings, clock=lambda: naive_utc_ns(planned_at))
    state.load()
    items = read_raw(warehouse, "items", columns=["item_id", "risk_level"])
    rules = _SubjectRules(
        surface,
        region,
        facts=facts,
        state=state,
        recipients=_recipients(warehouse),
        risk_by_item=dict(zip(items["item_id"].astype(int), items["risk_level"], strict=True)),
        sends=read_sends(warehouse, surface=surface_name, region=region),
    )
    tokens = _tokens(log)
    scheduled = dict(zip(log["list_id"], log["scheduled_send_at"], strict=True))
    template_version = DIGEST_TEMPLATE_VERSION if is_digest(surface_name) else None
    plan_rows: list[dict[str, object]] = []
    decisions: list[dict[str, object]] = []
    for list_id, rows in lists.sort_values(["subject_id", "position"]).groupby(
        "list_id", sort=False
    ):
        first = rows.iloc[0]
        subject_id = int(first["subject_id"])
        scheduled_at = pd.Timestamp(scheduled.get(list_id, pd.NaT))
        decision: dict[str, object] = {
            "subject_id": subject_id,
            "surface": surface_name,
            "region": region,
            "list_id": str(list_id),
            "version": str(first["version"]),
            "model_version": str(first["model_version"]),
            "scheduled_send_at": scheduled_at,
            "send_at": pd.NaT,
            "decision": SKIP,
            "reason": None,
            "item_count": 0,
            "item_rejections": "{}",
            "planned_at": planned_at,
            "template_version": template_version,
        }
        decisions.append(decision)
        if pd.isna(scheduled_at):  # publish gives every messaging list a send time
            scheduled_at = planned_at.ceil("h")
        reason = rules.person_reason(subject_id)
        send_at = None if reason else rules.send_time(subject_id, scheduled_at)
        if reason is None and send_at is None:
            reason = QUIET_HOURS
        if reason is None and send_at > pd.Timestamp(first["expires_at"]):
            reason = STALE_LIST
        if reason is None:
            reason = rules.cap_reason(subject_id, str(list_id), send_at)
        if reason is None:
            chosen, rejected, reason = rules.items(subject_id, rows, send_at)
            decision["item_rejections"] = json.dumps(dict(sorted((+rejected).items())))
        if reason is not None:
            decision["reason"] = reason
            continue
        decision.update(decision=SEND, send_at=send_at, item_count=len(chosen))
        recipient = rules.recipients.get(subject_id, Recipient("UTC", 0, 0))
        zone = recipient.timezone
        item_ids = chosen["item_id"].astype(int).tolist()
        plan_rows.append(
            {
                "subject_id": subject_id,
                "surface": surface_name,
                "medium": medium,
                "region": region,
                "list_id": str(list_id),
                "version": str(first["version"]),
                "model_version": str(first["model_version"]),
                "send_at": send_at,
                "send_at_local": _local_iso(send_at, zone),
                "timezone": known_timezone(zone),
                "item_ids": "|".join(map(str, item_ids)),
                "positions": "|".join(map(str, chosen["position"].astype(int))),
                "tracking_tokens": "|".join(tokens.get((str(list_id), i), "") for i in item_ids),
                "planned_at": planned_at,
                "locale": recipient.locale,
                "template_version": template_version,
            }
        )
    return SendPlan(
        surface_name,
        region,
        PLANNED,
        planned_at,
        _typed(pd.DataFrame(plan_rows, columns=PLAN_COLUMNS)),
        _typed(pd.DataFrame(decisions, columns=DECISION_COLUMNS)),
        version=manifest.active_version,
        model_version=manifest.lineage.get("model_version"),
    )


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable column types, so an empty plan reads back like a full one."""
    for column in ("send_at", "scheduled_send_at", "planned_at"):
        if column in frame.columns:
            frame[column] = pd.to_datetime(frame[column]).astype("datetime64[ns]")
    for column in ("subject_id", "item_count"):
        if column in frame.columns:
            frame[column] = frame[column].astype("int64")
    return frame


def write_send_plan(warehouse: Warehouse, plan: SendPlan) -> str:
    """Replace the partition's plan: plan.parquet, decision_log.parquet, then summary.json
    (written last: a plan folder whose summary names another planned_at is mid-write)."""
    root = plan_root(plan.surface, plan.region)
    warehouse.write_parquet(f"{root}/plan.parquet", _typed(plan.plan.copy()))
    warehouse.write_parquet(f"{root}/decision_log.parquet", _typed(plan.decisions.copy()))
    warehouse.write_json(f"{root}/summary.json", plan.summary())
    return root


def read_send_plan(warehouse: Warehouse, surface: str, region: str) -> pd.DataFrame:
    """The partition's current plan (raises FileNotFoundError before the first send_plans)."""
    root = plan_root(surface, region)
    if not warehouse.exists(f"{root}/summary.json"):
        raise FileNotFoundError(
            f"no send plan for {surface}/{region} in {warehouse.uri(root)}: materialize the "
            "send_plans asset for this partition first"
        )
    return warehouse.read_parquet(f"{root}/plan.parquet")
