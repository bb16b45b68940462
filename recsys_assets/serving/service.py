"""RecommendationService: the Python API of serving (the CLI and HTTP API wrap it).

For (subject, surface, region): take the partition's current lists once (an immutable
object, so a publish flip cannot mix versions) → the subject's list → the surface's stale
policy if it expired → final check in one batch → fill in order → top up from the
matching fallback list → an empty, safe response if nothing qualifies. Every response is
counted in the metrics and appended to the decision log.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from recsys_assets.channels.attribution import TrackingIndex
from recsys_assets.config import Settings, SurfaceConfig, load_settings
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR
from recsys_assets.rules.eligibility import CODE_BY_REASON, CONSENT_REVOKED
from recsys_assets.rules.person import CONSENT, EMAIL, PUSH, person_requirements
from recsys_assets.serving.decision_log import DecisionLog, DecisionRecord
from recsys_assets.serving.fill import Fill, RecommendedItem
from recsys_assets.serving.final_check import final_reason_codes
from recsys_assets.serving.metrics import ServingMetrics
from recsys_assets.serving.state import INT64_MAX, OnlineState, ServingEvent, Subject
from recsys_assets.serving.store import STORE_OK, ListStore, PublishedVersion
from recsys_assets.warehouse import Warehouse

log = logging.getLogger(__name__)

PRECOMPUTED = "precomputed"
PRECOMPUTED_STALE = "precomputed_stale"
FALLBACK = "fallback"
EMPTY = "empty"
SERVED_FROM = (PRECOMPUTED, PRECOMPUTED_STALE, FALLBACK, EMPTY)

# Why a request did not get (only) its own fresh list: metric label and decision-log value.
NO_LIST_FOR_SUBJECT = "no_list_for_subject"
UNKNOWN_SUBJECT = "unknown_subject"
STALE_NEVER = "stale_never_served"
STALE_BEYOND_BOUND = "stale_beyond_bound"
ALL_REJECTED = "all_rejected"
NOTHING_QUALIFIED = "nothing_qualified"
TOP_UP = "top_up"
STATE_UNAVAILABLE = "state_unavailable"

POPULAR_BY_REGION = "popular_by_region"
NEW_USER_DEFAULT = "new_user_default"
TENANT_DEFAULT_ACTIONS = "tenant_default_actions:{tenant}"
_CONSENT_REVOKED_CODE = CODE_BY_REASON[CONSENT_REVOKED]
_NS = 1_000_000_000


class ServingRequestError(ValueError):
    """A request serving cannot answer as asked; `status_code` is its HTTP status."""

    status_code = 400


class UnknownSurface(ServingRequestError):
    status_code = 404


class UnknownRegion(ServingRequestError):
    status_code = 422


class InvalidLimit(ServingRequestError):
    status_code = 422


class InvalidSubject(ServingRequestError):
    status_code = 422


@dataclass(slots=True)
class Recommendation:
    """One response: the served items and where they came from."""

    request_id: str
    subject_id: int
    surface: str
    region: str
    list_id: str | None
    version: str | None
    served_from: str
    generated_at: str | None
    expires_at: str | None
    model_version: str | None
    items: list[RecommendedItem]
    rejections: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "subject_id": self.subject_id,
            "surface": self.surface,
            "region": self.region,
            "list_id": self.list_id,
            "version": self.version,
            "served_from": self.served_from,
            "generated_at": self.generated_at,
            "expires_at": self.expires_at,
            "model_version": self.model_version,
            "items": self.items,
            "rejections": self.rejections,
        }


@dataclass(frozen=True, slots=True)
class SurfacePolicy:
    """A surface's serving rules, precomputed from its configuration."""

    name: str
    display_count: int
    stale_mode: str
    max_stale_ns: int
    frequency_cap: int
    requires_consent: bool
    requires_email: bool
    requires_push: bool
    enterprise: bool

    @classmethod
    def of(cls, surface: SurfaceConfig) -> SurfacePolicy:
        requires = set(surface.eligibility.requires)
        person = person_requirements(surface)
        return cls(
            name=surface.name,
            display_count=surface.display_count,
            stale_mode=surface.stale_policy.mode,
            max_stale_ns=int(surface.stale_policy.max_stale.total_seconds() * _NS),
            frequency_cap=surface.channel_rules.frequency_cap_per_day,
            requires_consent=CONSENT in person,
            requires_email=EMAIL in person,
            requires_push=PUSH in person,
            enterprise="tenant_actor" in requires,
        )

    @property
    def messaging(self) -> bool:
        """A send (email, push): never fall back to a generic list without consent."""
        return self.requires_email or self.requires_push

    def usable(self, expires_at_ns: int, now_ns: int) -> bool:
        """Whether a list expiring at `expires_at_ns` may still be served (with the check)."""
        if now_ns <= expires_at_ns:
            return True
        return self.stale_mode != "never" and now_ns - expires_at_ns <= self.max_stale_ns


class RecommendationService:
    """Answers recommendation requests from the published lists with a final online check.

    `start()` loads lists and state and starts the background poller (manifests,
    tombstones, raw snapshot, other replicas' events) and the decision-log writer;
    `close()` stops them and flushes the log. Usable as a context manager.
    """

    def __init__(
        self,
        warehouse: Warehouse | None = None,
        settings: Settings | None = None,
        *,
        clock: Any = time.time_ns,
        metrics: ServingMetrics | None = None,
        decision_log: DecisionLog | None = None,
        poll_interval_s: float | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.warehouse = warehouse or Warehouse.from_env()
        self.clock = clock
        self.store = ListStore(self.warehouse, self.settings)
        self.state = OnlineState(self.warehouse, self.settings, clock=clock)
        self.metrics = metrics or ServingMetrics()
        self.decision_log = decision_log or DecisionLog(self.warehouse)
        self.metrics.watch_decision_log(self.decision_log)
        self.attribution = TrackingIndex(
            self.warehouse, secret=os.environ.get(TRACKING_SECRET_ENV_VAR, "").strip() or None
        )
        self.metrics.watch_channels(self.attribution)
        self.poll_interval_s = poll_interval_s or self.settings.serving.manifest_poll_interval_s
        self.policies = {name: SurfacePolicy.of(s) for name, s in self.settings.surfaces.items()}
        self.regions = frozenset(self.settings.regions)
        self._loaded = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._request_prefix = os.urandom(4).hex()
        self._request_numbers = itertools.count(1)
        self._refresh_errors_seen = 0

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> None:
        """Read state and the active lists now (the CLI's one-shot path)."""
        self.state.load()
        self._refresh_store()
        self.attribution.refresh()
        self._loaded = True

    def start(self) -> None:
        if not self._loaded:
            self.load()
        self.decision_log.start()
        if self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll, name="serving-poller", daemon=True)
            self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
            self._poller = None
        self.decision_log.close()

    def __enter__(self) -> RecommendationService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Pick up manifest flips, tombstones, a new raw snapshot and others' events now."""
        self.state.sync()
        self._refresh_store()
        self.attribution.refresh()

    def _refresh_store(self) -> None:
        for change in self.store.refresh():
            log.info("serving: %s", change)
        errors = self.store.refresh_errors
        if errors > self._refresh_errors_seen:
            self.metrics.store_refresh_errors.inc(errors - self._refresh_errors_seen)
            self._refresh_errors_seen = errors
        active: dict[tuple[str, str, str], str] = {}
        for surface in self.settings.surfaces:
            for region in self.settings.regions:
                lists = self.store.lists(surface, region)
                if lists.personalized is not None:
                    active[(surface, region, "lists")] = lists.personalized.version
                if lists.fallback is not None:
                    active[(surface, region, "fallback")] = lists.fallback.version
        self.metrics.set_active_versions(active)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # the poller must outlive a bad tick; the next one retries
                log.exception("serving: refresh failed")

    # -- events ---------------------------------------------------------------------------

    def record_events(self, events: Iterable[ServingEvent]) -> str:
        """Persist and apply user events; effective for the next request. Returns the file."""
        return self.state.record(events)

    def record_engagement(
        self, event_type: str, token: str, *, item_id: int | None = None
    ) -> str | None:
        """Attribute an open or click to its send by its tracking token (verified); returns
        the event file (None for a repeat, counted once). Raises
        `channels.attribution.AttributionError` when it cannot."""
        return self.attribution.record(event_type, token, item_id=item_id)

    # -- requests -------------------------------------------------------------------------

    def check_request(self, surface: str, region: str, limit: int | None) -> int:
        """How many items the request wants; raises ServingRequestError for a bad request."""
        policy = self.policies.get(surface)
        if policy is None:
            raise UnknownSurface(
                f"unknown surface {surface!r}; configured surfaces: {sorted(self.policies)}"
            )
        if region not in self.regions:
            raise UnknownRegion(
                f"unknown region {region!r}; configured regions: {list(self.settings.regions)}"
            )
        if limit is None:
            return policy.display_count
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise InvalidLimit(f"limit must be an integer, got {limit!r}")
        if not 1 <= limit <= policy.display_count:
            raise InvalidLimit(
                f"limit must be between 1 and {surface}'s display_count "
                f"({policy.display_count}), got {limit}"
            )
        return limit

    @staticmethod
    def check_subject(subject_id: int) -> None:
        """Raise InvalidSubject unless `subject_id` is a user id (an int64, >= 0)."""
        if isinstance(subject_id, bool) or not isinstance(subject_id, int):
            raise InvalidSubject(f"subject_id must be an integer, got {subject_id!r}")
        if not 0 <= subject_id <= INT64_MAX:
            raise InvalidSubject(f"subject_id must be in 0..{INT64_MAX}, got {subject_id}")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(ready, detail): ready when requests can be answered with a final check.

        Not ready before the first load and while there is no item state (no raw snapshot
        was ever readable): every item would be refused. A missing manifest or a raw
        snapshot that vanished after loading is reported but keeps serving what is loaded.
        """
        reasons = []
        if not self._loaded:
            reasons.append("not started: lists and state are not loaded yet")
        if not self.state.ready:
            reasons.append(self.state.problem or "no item state loaded")
        warnings = [self.state.problem] if self.state.ready and self.state.problem else []
        partitions: dict[str, dict[str, Any]] = {}
        for (surface, region), lists in sorted(self.store.partitions().items()):
            entry = {}
            for kind, version, status in (
                ("lists", lists.personalized, lists.personalized_status),
                ("fallback", lists.fallback, lists.fallback_status),
            ):
                entry[kind] = {"version": version.version if version else None, "status": status}
                if version is not None and status != STORE_OK:
                    warnings.append(
                        f"{surface}/{region} {kind}: {status}, serving loaded version "
                        f"{version.version}"
                    )
            partitions[f"{surface}/{region}"] = entry
        detail = {
            "status": "ok" if not reasons else "not_ready",
            "reasons": reasons,
            "warnings": warnings,
            "snapshot_id": self.state.snapshot_id,
            "partitions": partitions,
        }
        return not reasons, detail

    def recommend(
        self,
        subject_id: int,
        surface: str,
        region: str,
        *,
        limit: int | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Recommendation:
        """The subject's recommendations on `surface` in `region`, checked and filled."""
        started = time.perf_counter()
        self.check_subject(subject_id)
        want = self.check_request(surface, region, limit)
        policy = self.policies[surface]
        now_ns = self.clock()
        state = self.state
        subject = state.subject(subject_id)
        lists = self.store.lists(surface, region)
        catalog = state.catalog
        check = partial(
            final_reason_codes,
            catalog=catalog,
            region=region,
            now_ns=now_ns,
            subject=subject,
            filters=state.filters(subject_id, surface),
            frequency_cap=policy.frequency_cap,
        )
        fill = Fill(want)
        primary: tuple[PublishedVersion, int] | None = None
        served_from = EMPTY
        cause: str | None = None
        stale_outcome: str | None = None
        store_hit = False

        version = lists.personalized
        list_index = version.find_subject(subject_id) if version is not None else -1
        tenant_key = (
            [TENANT_DEFAULT_ACTIONS.format(tenant=subject.tenant_id)] if subject.tenant_id else []
        )
        top_up_keys = tenant_key if policy.enterprise else [POPULAR_BY_REGION]
        fallback_keys = top_up_keys if policy.enterprise else [NEW_USER_DEFAULT, POPULAR_BY_REGION]
        if not state.ready:  # nothing can be checked: never serve blindly
            cause, fallback_keys = STATE_UNAVAILABLE, []
        elif not subject.known and policy.messaging:
            cause, fallback_keys = UNKNOWN_SUBJECT, []
        elif subject.known and not self._consented(policy, subject):
            cause = CONSENT_REVOKED
            if version is not None and list_index >= 0:
                fill.reject_all(version, list_index, _CONSENT_REVOKED_CODE)
            if policy.messaging:
                fallback_keys = []
            elif policy.enterprise:  # the tenant's default actions are not personal
                fallback_keys = top_up_keys
            else:
                fallback_keys = [POPULAR_BY_REGION, NEW_USER_DEFAULT]
        elif version is None:
            cause = lists.personalized_status
        elif list_index < 0:
            cause = NO_LIST_FOR_SUBJECT
        else:
            expires_at_ns = int(version.expires_at_ns[list_index])
            stale = now_ns > expires_at_ns
            if stale and policy.stale_mode == "never":
                cause, stale_outcome, fallback_keys = STALE_NEVER, "empty", []
            elif stale and now_ns - expires_at_ns > policy.max_stale_ns:
                cause, stale_outcome = STALE_BEYOND_BOUND, "fallback"
            else:
                if stale:
                    stale_outcome = "served_with_check"
                fallback_keys = top_up_keys
                if fill.take(version, list_index, check, version.positions_in(catalog.arrays)):
                    primary = (version, list_index)
                    served_from = PRECOMPUTED_STALE if stale else PRECOMPUTED
                    store_hit = True
                else:
                    cause = ALL_REJECTED

        fallback = lists.fallback
        if fallback is not None:
            for key in fallback_keys:
                if fill.full:
                    break
                index = fallback.find_context(key)
                if index < 0 or not policy.usable(int(fallback.expires_at_ns[index]), now_ns):
                    continue
                if not fill.take(fallback, index, check, fallback.positions_in(catalog.arrays)):
                    continue
                if primary is None:
                    primary = (fallback, index)
                    served_from = FALLBACK
                elif cause is None:
                    cause = TOP_UP
        if primary is None and cause is None:
            cause = NOTHING_QUALIFIED

        request_id = f"{self._request_prefix}-{next(self._request_numbers)}"
        rejections = fill.rejections_by_reason()
        if primary is None:
            recommendation = Recommendation(
                request_id,
                subject_id,
                surface,
                region,
                None,
                None,
                EMPTY,
                None,
                None,
                None,
                [],
                rejections,
            )
        else:
            source, index = primary
            recommendation = Recommendation(
                request_id,
                subject_id,
                surface,
                region,
                source.list_ids[index],
                source.version,
                served_from,
                source.iso(int(source.generated_at_ns[index])),
                source.iso(int(source.expires_at_ns[index])),
                source.model_versions[index] or None,
                fill.items,
                rejections,
            )
        latency_s = time.perf_counter() - started
        self.metrics.observe(
            surface=surface,
            region=region,
            model_version=recommendation.model_version or "none",
            served_from=served_from,
            store_hit=store_hit,
            stale_outcome=stale_outcome,
            fallback_cause=cause,
            rejections=rejections,
            items_checked=fill.checked,
            latency_s=latency_s,
        )
        self.decision_log.append(
            DecisionRecord(
                now_ns,
                recommendation,
                cause,
                limit,
                dict(context) if context else None,
                latency_s * 1e6,
            )
        )
        return recommendation

    @staticmethod
    def _consented(policy: SurfacePolicy, subject: Subject) -> bool:
        return (
            (not policy.requires_consent or subject.consent_personalization)
            and (not policy.requires_email or subject.email_subscribed)
            and (not policy.requires_push or subject.push_enabled)
        )
