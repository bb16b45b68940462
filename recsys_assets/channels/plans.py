"""Send plans: for each subject of an email, push or digest partition, send or skip.

A published list is a proposal; whether a message goes out is decided per subject at its
scheduled send time (publish's `scheduled_send_at`), each rule from the surface's
`channel_rules` with its own skip reason, in this order (the first that fails is logged):

1. **Subscribed**: the surface's person requirements (`rules.person`: consent plus
   `email_subscribed` / `push_enabled`) on the latest raw users with the consent,
   unsubscribe and push opt-out events applied, and user tombstones as serving honours
   them. Unknown subject: skipped.
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

Each rule is one function below that judges every subject (or item row) of the partition
at once and returns what it refuses; `_decide` applies them in order, a rule naming only the
subjects no earlier rule skipped. What depends on a send time is computed once per distinct
value, and serving's per-list final check runs only for people with personal filters, so a
plan costs a few array passes over the partition, not pandas work per subject
(docs/BENCHMARKS.md, "Send plans").

Every send and every skip becomes a decision-log row; sends also a plan row with the items
(at most `display_count`), their list positions and publish's tracking tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recsys_assets.channels.digest import DEFAULT_LOCALE, DIGEST_TEMPLATE_VERSION, is_digest
from recsys_assets.channels.ledger import PLANS_PREFIX, read_sends
from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.config.settings import ChannelRulesConfig
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
LIST_COLUMNS = [
    "list_id", "subject_id", "version", "model_version", "expires_at", "position", "item_id",
    "calibrated",
]  # fmt: skip
"""What the rules read of a published version's lists.parquet (a few of its columns)."""
LOG_COLUMNS = ["list_id", "scheduled_send_at", "selected_item_ids", "tracking_tokens"]
"""What they read of its decision_log.parquet: send times and tracking tokens."""


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


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})


def _skip(reasons: np.ndarray, failed: np.ndarray, reason: str) -> None:
    """Give `reason` to the subjects failing a rule that passed every earlier one."""
    reasons[failed & pd.isna(reasons)] = reason


def _any_per_subject(slots: np.ndarray, rows: np.ndarray, subjects: int) -> np.ndarray:
    """True per subject with at least one of `rows` (a row mask) among its items."""
    return np.bincount(slots[rows], minlength=subjects) > 0


def _list_rows(lists: pd.DataFrame, log: pa.Table) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, subjects): the lists' items ordered by subject, list and position, each with
    `slot`, the row of its list in `subjects`; one row per list in `subjects`, with publish's
    `scheduled_send_at` (NaT when the decision log has none)."""
    rows = lists.sort_values(["subject_id", "list_id", "position"], kind="stable")
    rows = rows.reset_index(drop=True)
    list_ids = rows["list_id"].astype(str).to_numpy()
    first = np.ones(len(rows), dtype=bool)
    first[1:] = list_ids[1:] != list_ids[:-1]
    rows["slot"] = np.cumsum(first) - 1
    subjects = rows.loc[first, ["list_id", "subject_id", "version", "model_version", "expires_at"]]
    subjects = subjects.reset_index(drop=True).astype({"list_id": str, "subject_id": "int64"})
    scheduled = log.select(["list_id", "scheduled_send_at"]).to_pandas()
    scheduled = scheduled.astype({"list_id": str}).drop_duplicates("list_id").set_index("list_id")
    subjects["scheduled_send_at"] = pd.to_datetime(
        subjects["list_id"].map(scheduled["scheduled_send_at"])
    ).astype("datetime64[ns]")
    return rows, subjects


def _recipients(warehouse: Warehouse, subject_ids: np.ndarray) -> pd.DataFrame:
    """Per subject (aligned with `subject_ids`): a timezone pandas knows, quiet hours and
    locale from raw users; someone not in users gets UTC, no quiet hours, the default locale."""
    users = read_raw(
        warehouse,
        "users",
        columns=["user_id", "timezone", "quiet_hours_start", "quiet_hours_end", "locale"],
    ).drop_duplicates("user_id", keep="last")
    found = users.set_index("user_id").reindex(subject_ids)
    zones = found["timezone"].fillna("UTC").astype(str)
    known = {zone: known_timezone(zone) for zone in zones.unique()}
    return pd.DataFrame(
        {
            "timezone": zones.map(known).to_numpy(dtype=object),
            "quiet_hours_start": found["quiet_hours_start"].fillna(0).to_numpy(dtype=np.int64),
            "quiet_hours_end": found["quiet_hours_end"].fillna(0).to_numpy(dtype=np.int64),
            "locale": found["locale"].fillna(DEFAULT_LOCALE).astype(str).to_numpy(dtype=object),
        }
    )


# -- the rules, in order: each returns what it refuses ----------------------------------------


def not_subscribed(
    subject_ids: np.ndarray, surface: SurfaceConfig, *, facts: PersonFacts, state: OnlineState
) -> np.ndarray:
    """Skip reason per subject from the person rules at send time (None: may receive): an
    unknown subject, then each required flag as the raw users and the serving events since
    leave it, then a user tombstone (serving's `no_personalization`)."""
    users = facts.current_users.drop_duplicates("user_id").set_index("user_id")
    found = users.reindex(subject_ids)
    reasons = np.full(len(subject_ids), None, dtype=object)
    _skip(reasons, ~np.isin(subject_ids, users.index.to_numpy()), UNKNOWN_SUBJECT)
    for flag in person_requirements(surface):
        _skip(reasons, ~found[flag].eq(True).to_numpy(), NOT_SUBSCRIBED[flag])
    tombstoned = np.fromiter(state.persons.no_personalization, dtype=np.int64)
    _skip(reasons, np.isin(subject_ids, tombstoned), NOT_SUBSCRIBED[CONSENT])
    return reasons


def quiet_hours_end(
    send_at: pd.Timestamp, timezone: str, quiet_start: int, quiet_end: int
) -> pd.Timestamp | None:
    """The first full hour at/after `send_at` outside the quiet hours [start, end) in
    `timezone` (naive UTC), or None when `send_at` is not quiet. Stepping in UTC keeps DST
    unambiguous."""
    zone = known_timezone(timezone)
    local = send_at.tz_localize("UTC").tz_convert(zone)
    if not in_quiet_hours(local.hour, quiet_start, quiet_end):
        return None
    candidate = send_at.floor("h")
    for _ in range(25):
        candidate += pd.Timedelta(hours=1)
        hour = candidate.tz_localize("UTC").tz_convert(zone).hour
        if not in_quiet_hours(hour, quiet_start, quiet_end):
            return candidate
    return None  # quiet all day (start == end is never quiet, so unreachable)


def quiet_hours_send_times(
    scheduled: pd.Series, recipients: pd.DataFrame, rules: ChannelRulesConfig
) -> np.ndarray:
    """Send time per subject: outside quiet hours the scheduled time; inside, the end of the
    quiet hours (`quiet_hours_mode: defer`) or NaT, skipped for quiet hours (`skip`). Judged
    once per distinct (scheduled time, timezone, quiet hours)."""
    send_at = scheduled.to_numpy(dtype="datetime64[ns]").copy()
    if not rules.quiet_hours or len(send_at) == 0:
        return send_at
    profile = recipients[["timezone", "quiet_hours_start", "quiet_hours_end"]].assign(
        scheduled_send_at=send_at
    )
    keys = ["scheduled_send_at", "timezone", "quiet_hours_start", "quiet_hours_end"]
    distinct = profile[keys].drop_duplicates()
    ends = [
        quiet_hours_end(pd.Timestamp(at), str(zone), int(start), int(end))
        for at, zone, start, end in distinct.itertuples(index=False)
    ]
    distinct["quiet"] = [end is not None for end in ends]
    distinct["deferred"] = pd.Series(
        [pd.NaT if end is None else end for end in ends], index=distinct.index, dtype=object
    ).astype("datetime64[ns]")
    judged = profile.merge(distinct, on=keys, how="left")
    quiet = judged["quiet"].to_numpy(dtype=bool)
    deferred = judged["deferred"].to_numpy(dtype="datetime64[ns]")
    if rules.quiet_hours_mode == "defer":
        send_at[quiet] = deferred[quiet]
    else:
        send_at[quiet] = np.datetime64("NaT")
    return send_at


def stale_lists(send_at: np.ndarray, expires_at: pd.Series) -> np.ndarray:
    """True where the list expires before the send time (never sent stale)."""
    return send_at > expires_at.to_numpy(dtype="datetime64[ns]")


def already_sent(list_ids: pd.Series, history: pd.DataFrame) -> np.ndarray:
    """True where the ledger already holds a send of this very list."""
    return list_ids.isin(history["list_id"].astype(str).unique()).to_numpy()


def over_send_cap(
    subject_ids: np.ndarray, send_at: np.ndarray, history: pd.DataFrame, rules: ChannelRulesConfig
) -> np.ndarray:
    """True where the subject already has `max_sends` sends less than `send_cap_window`
    from this send time (before or after it) in the ledger."""
    capped = np.zeros(len(subject_ids), dtype=bool)
    if rules.max_sends == 0 or history.empty or len(subject_ids) == 0:
        return capped
    window = np.timedelta64(pd.Timedelta(rules.send_cap_window).value, "ns")
    sends = history.drop_duplicates("send_key")
    prior = sends["send_at"].to_numpy(dtype="datetime64[ns]")
    near = (prior > np.nanmin(send_at) - window) & (prior < np.nanmax(send_at) + window)
    sends = pd.DataFrame(
        {"subject_id": sends["subject_id"].to_numpy(dtype=np.int64)[near], "prior": prior[near]}
    )
    pairs = pd.DataFrame(
        {"slot": np.arange(len(subject_ids)), "subject_id": subject_ids, "send_at": send_at}
    ).merge(sends, on="subject_id")
    apart = (pairs["send_at"] - pairs["prior"]).abs().to_numpy()
    recent = pairs["slot"].to_numpy()[apart < window]
    return np.bincount(recent, minlength=len(subject_ids)) >= rules.max_sends


def final_check_codes(
    item_ids: np.ndarray,
    slots: np.ndarray,
    subject_ids: np.ndarray,
    send_ns: np.ndarray,
    *,
    state: OnlineState,
    surface: SurfaceConfig,
    region: str,
) -> np.ndarray:
    """Serving's final check per item row at its subject's send time (0 = may be sent).

    Rows are grouped by ascending `slots`, the subjects' index into `subject_ids` and
    `send_ns`. People with personal filters (hides, purchases, recent exposures, tombstones
    naming them) go through `final_reason_codes` one list each, as serving checks them;
    everyone else needs only the item-state codes, one batch per (send time, tenant, role).
    """
    catalog = state.catalog
    positions = catalog.arrays.positions(item_ids)
    present = np.unique(slots)
    people = {slot: state.subject(int(subject_ids[slot])) for slot in present.tolist()}
    row_people = [people[slot] for slot in slots.tolist()]
    actors = pd.DataFrame(
        {
            "send_ns": send_ns[slots],
            "tenant": [person.tenant_id for person in row_people],
            "role": [person.actor_role for person in row_people],
        }
    )
    codes = np.zeros(len(item_ids), dtype=np.int8)
    groups = actors.groupby(["send_ns", "tenant", "role"], dropna=False, sort=False).indices
    for (now_ns, tenant, role), chosen in groups.items():
        codes[chosen] = catalog.arrays.reason_codes(
            positions[chosen],
            region=region,
            now_ns=int(now_ns),
            actor_tenant=None if pd.isna(tenant) else str(tenant),
            actor_role=None if pd.isna(role) else str(role),
        )
    starts = np.searchsorted(slots, present)
    stops = np.searchsorted(slots, present, side="right")
    cap = surface.channel_rules.frequency_cap_per_day
    for slot, start, stop in zip(present.tolist(), starts.tolist(), stops.tolist(), strict=True):
        filters = state.filters(int(subject_ids[slot]), surface.name)
        if filters is None:
            continue
        codes[start:stop] = final_reason_codes(
            item_ids[start:stop],
            positions[start:stop],
            catalog=catalog,
            region=region,
            now_ns=int(send_ns[slot]),
            subject=people[slot],
            filters=filters,
            frequency_cap=cap,
        )
    return codes


def risk_blocked(
    item_ids: np.ndarray, risk_levels: pd.Series, rules: ChannelRulesConfig
) -> np.ndarray:
    """True per item row whose raw `risk_level` the channel blocks (`blocked_risk_levels`)."""
    if not rules.blocked_risk_levels:
        return np.zeros(len(item_ids), dtype=bool)
    return pd.Series(item_ids).map(risk_levels).isin(rules.blocked_risk_levels).to_numpy()


def below_relevance(calibrated: np.ndarray, rules: ChannelRulesConfig) -> np.ndarray:
    """True per item row whose calibrated probability misses `min_relevance` (unknown too)."""
    if rules.min_relevance <= 0:
        return np.zeros(len(calibrated), dtype=bool)
    return ~(calibrated >= rules.min_relevance)


def first_slot_order(
    slots: np.ndarray, confidence: np.ndarray, threshold: float | None, *, subjects: int
) -> tuple[np.ndarray, np.ndarray]:
    """(message order of the rows, True per slot whose best item misses the threshold).

    `slots` are ascending, rows in list order within a slot. With a threshold, each message
    opens with its most confident item (the first of equals, unknown counting as -1), the
    rest keep list order.
    """
    order = np.arange(len(slots))
    missed = np.zeros(subjects, dtype=bool)
    if threshold is None or len(slots) == 0:
        return order, missed
    confidence = np.nan_to_num(confidence, nan=-1.0)
    first = np.r_[True, slots[1:] != slots[:-1]]
    starts = np.flatnonzero(first)
    best = np.maximum.reduceat(confidence, starts)
    missed[slots[starts]] = best < threshold
    at_best = confidence == best[np.cumsum(first) - 1]
    first_best = np.minimum.reduceat(np.where(at_best, order, len(order)), starts)
    rank = order.copy()
    rank[first_best] = -1
    return np.lexsort((rank, slots)), missed


def _rejections(
    slots: np.ndarray, reasons: np.ndarray, judged: np.ndarray, subjects: int
) -> np.ndarray:
    """`item_rejections` JSON per subject: rejected items by reason (rows where `reasons` is
    set), "{}" for a subject with none."""
    texts = np.full(subjects, "{}", dtype=object)
    rejected = judged & pd.notna(reasons)
    if not rejected.any():
        return texts
    counts = pd.DataFrame({"slot": slots[rejected], "reason": reasons[rejected]}).value_counts()
    found: dict[int, dict[str, int]] = {}
    for (slot, reason), count in counts.sort_index().items():
        found.setdefault(int(slot), {})[str(reason)] = int(count)
    for slot, by_reason in found.items():
        texts[slot] = json.dumps(by_reason)
    return texts


def _joined(values: pa.Array, slots: np.ndarray) -> np.ndarray:
    """`|`-joined values per run of equal `slots` (ascending), in row order, joined by arrow
    (a pandas groupby-join per subject was most of a plan)."""
    starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]]) if len(slots) else slots
    offsets = pa.array(np.append(starts, len(slots)).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, values.cast(pa.string()))
    return pc.binary_join(lists, "|").to_numpy(zero_copy_only=False)


def _tokens(log: pa.Table, chosen: pd.DataFrame) -> pa.Array:
    """Publish's tracking token of each chosen (list_id, item_id) row ("" when none), from
    the version's decision log (`selected_item_ids` and `tracking_tokens`, `|`-joined)."""
    list_ids = pd.Index(chosen["list_id"].astype(str).unique())
    log = log.filter(
        pc.and_(
            pc.is_in(
                log["list_id"],
                value_set=pa.array(list_ids.to_numpy(dtype=object), log["list_id"].type),
            ),
            pc.is_valid(log["tracking_tokens"]),
        )
    )
    items = pc.split_pattern(log["selected_item_ids"].combine_chunks(), "|")
    tokens = pc.list_flatten(pc.split_pattern(log["tracking_tokens"].combine_chunks(), "|"))
    owners = list_ids.get_indexer(log["list_id"].to_pandas())[pc.list_parent_indices(items)]
    published = pd.DataFrame(
        {
            "owner": owners,
            "item_id": pc.list_flatten(items).cast(pa.int64()).to_numpy(),
            "token_index": np.arange(len(tokens)),
        }
    ).drop_duplicates(["owner", "item_id"])
    wanted = pd.DataFrame(
        {
            "owner": list_ids.get_indexer(chosen["list_id"].astype(str)),
            "item_id": chosen["item_id"].to_numpy(dtype=np.int64),
        }
    )
    found = wanted.merge(published, how="left")["token_index"].astype("Int64")
    return pc.fill_null(tokens.take(pa.array(found)), "")


def _scatter(chosen: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A mask over all subjects from `values` over the `chosen` ones (False elsewhere)."""
    found = np.zeros(len(chosen), dtype=bool)
    found[chosen] = values
    return found


def _risk_levels(warehouse: Warehouse) -> pd.Series:
    """Raw `risk_level` by item_id."""
    items = read_raw(warehouse, "items", columns=["item_id", "risk_level"])
    items = items.drop_duplicates("item_id", keep="last")
    return pd.Series(items["risk_level"].to_numpy(), index=items["item_id"].to_numpy(np.int64))


def _decide(
    rows: pd.DataFrame,
    subjects: pd.DataFrame,
    *,
    surface: SurfaceConfig,
    region: str,
    planned_at: pd.Timestamp,
    facts: PersonFacts,
    state: OnlineState,
    recipients: pd.DataFrame,
    risk_levels: pd.Series,
    history: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(`subjects` with their decision, reason, send time, item count and item rejections,
    timezone and locale; the item rows of the sends, in message order).

    Each rule judges the subjects no earlier rule skipped; the first that fails names the
    skip reason.
    """
    rules = surface.channel_rules
    count = len(subjects)
    subject_ids = subjects["subject_id"].to_numpy(dtype=np.int64)
    # publish gives every messaging list a send time; a list without one goes next hour
    scheduled = subjects["scheduled_send_at"].fillna(planned_at.ceil("h"))
    reasons = not_subscribed(subject_ids, surface, facts=facts, state=state)
    send_at = quiet_hours_send_times(scheduled, recipients, rules)
    _skip(reasons, np.isnat(send_at), QUIET_HOURS)
    _skip(reasons, stale_lists(send_at, subjects["expires_at"]), STALE_LIST)
    _skip(reasons, already_sent(subjects["list_id"], history), ALREADY_SENT)
    undecided = pd.isna(reasons)
    capped = over_send_cap(subject_ids[undecided], send_at[undecided], history, rules)
    _skip(reasons, _scatter(undecided, capped), SEND_CAP)

    slots = rows["slot"].to_numpy()
    item_ids = rows["item_id"].to_numpy(dtype=np.int64)
    judged = pd.isna(reasons)[slots]  # the rows of subjects that reach the item rules
    row_reasons = np.full(len(rows), None, dtype=object)
    codes = final_check_codes(
        item_ids[judged],
        slots[judged],
        subject_ids,
        send_at.view(np.int64),
        state=state,
        surface=surface,
        region=region,
    )
    row_reasons[judged] = np.asarray(REASON_BY_CODE, dtype=object)[codes]
    kept = judged & pd.isna(row_reasons)
    _skip(reasons, ~_any_per_subject(slots, kept, count), NO_ELIGIBLE_ITEM)
    risky = kept & risk_blocked(item_ids, risk_levels, rules)
    row_reasons[risky] = RISK_LEVEL_BLOCKED
    kept &= ~risky
    _skip(reasons, ~_any_per_subject(slots, kept, count), RISK_LEVEL_BLOCKED)
    calibrated = rows["calibrated"].astype(float).to_numpy()
    weak = kept & below_relevance(calibrated, rules)
    row_reasons[weak] = BELOW_RELEVANCE
    kept &= ~weak
    _skip(reasons, ~_any_per_subject(slots, kept, count), BELOW_RELEVANCE)
    kept_rows = np.flatnonzero(kept)
    order, missed = first_slot_order(
        slots[kept_rows], calibrated[kept_rows], rules.first_slot_min_relevance, subjects=count
    )
    _skip(reasons, missed, NO_HIGH_CONFIDENCE_ITEM)

    sending = pd.isna(reasons)
    message = kept_rows[order]
    message = message[sending[slots[message]]]
    message = message[_rank_in_slot(slots[message]) < surface.display_count]
    decided = subjects.assign(
        send_at=np.where(sending, send_at, np.datetime64("NaT")),
        decision=np.where(sending, SEND, SKIP),
        reason=reasons,
        item_count=np.bincount(slots[message], minlength=count),
        item_rejections=_rejections(slots, row_reasons, judged, count),
        timezone=recipients["timezone"].to_numpy(),
        locale=recipients["locale"].to_numpy(),
    )
    return decided, rows.iloc[message]


def _rank_in_slot(slots: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal slots."""
    index = np.arange(len(slots))
    starts = np.r_[True, slots[1:] != slots[:-1]] if len(slots) else np.zeros(0, dtype=bool)
    return index - np.maximum.accumulate(np.where(starts, index, 0))


def _local_times(send_at: pd.Series, timezones: pd.Series) -> np.ndarray:
    """The send time in the subject's timezone, ISO 8601, once per distinct pair."""
    frame = pd.DataFrame(
        {"send_at": send_at.to_numpy(dtype="datetime64[ns]"), "timezone": timezones.to_numpy()}
    )
    distinct = frame.drop_duplicates()
    distinct["local"] = [
        pd.Timestamp(at).tz_localize("UTC").tz_convert(zone).isoformat()
        for at, zone in distinct.itertuples(index=False)
    ]
    return frame.merge(distinct, how="left")["local"].to_numpy(dtype=object)


def _plan_rows(
    decisions: pd.DataFrame, chosen: pd.DataFrame, log: pa.Table, *, medium: str
) -> pd.DataFrame:
    """One plan row per send: its items, list positions and tracking tokens `|`-joined."""
    sends = decisions[decisions["decision"] == SEND]
    slots = chosen["slot"].to_numpy()  # ascending, every send's slot present
    return sends.assign(
        medium=medium,
        send_at_local=_local_times(sends["send_at"], sends["timezone"]),
        item_ids=_joined(pa.array(chosen["item_id"].to_numpy(np.int64)), slots),
        positions=_joined(pa.array(chosen["position"].to_numpy(np.int64)), slots),
        tracking_tokens=_joined(_tokens(log, chosen), slots),
    )


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
    lists_path = f"{manifest.active_path}/lists.parquet"
    stored = set(warehouse.dataset(lists_path).schema.names)
    lists = warehouse.read_parquet(
        lists_path, columns=[name for name in LIST_COLUMNS if name in stored]
    )
    if "calibrated" not in stored:  # published before lists stored the probability
        lists["calibrated"] = np.nan
    log = warehouse.read_arrow(f"{manifest.active_path}/decision_log.parquet", columns=LOG_COLUMNS)
    facts = read_person_facts(warehouse)
    if facts is None:
        raise FileNotFoundError(
            "cannot plan sends: the raw snapshot or its users / interactions / user_controls "
            "table is missing, so nobody's subscription can be judged"
        )
    state = OnlineState(warehouse, settings, clock=lambda: naive_utc_ns(planned_at))
    state.load()
    rows, subjects = _list_rows(lists, log)
    decisions, chosen = _decide(
        rows,
        subjects,
        surface=surface,
        region=region,
        planned_at=planned_at,
        facts=facts,
        state=state,
        recipients=_recipients(warehouse, subjects["subject_id"].to_numpy()),
        risk_levels=_risk_levels(warehouse),
        history=read_sends(warehouse, surface=surface_name, region=region),
    )
    template_version = DIGEST_TEMPLATE_VERSION if is_digest(surface_name) else None
    decisions = decisions.assign(
        surface=surface_name,
        region=region,
        planned_at=planned_at,
        template_version=template_version,
    )
    plan = _plan_rows(decisions, chosen, log, medium=medium)
    return SendPlan(
        surface_name,
        region,
        PLANNED,
        planned_at,
        _typed(plan.assign(planned_at=planned_at, template_version=template_version)[PLAN_COLUMNS]),
        _typed(decisions[DECISION_COLUMNS]),
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
