"""RecommendationService: the Python API of serving (the CLI and HTTP API wrap it).

For (subject, surface, region): take the partition's current lists once (an immutable
object, so a publish flip cannot mix versions) → the subject's list → the surface's stale
policy if it expired → final check in one batch → fill in order → top up from the
matching fallback list → an empty, safe response if nothing qualifies. Every response is
counted in the metrics and appended to the decision log.

How the subject's own list is found is the surface's serving mode (`serving_mode`, or the
subject's arm of the surface's experiment), dispatched in one place: `serving_modes`
maps each mode to the function that serves it. A kill (`serving/kills.py`) overrides the
mode for a killed surface or region, and removes a killed campaign's items in the check.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from recsys_assets.channels.attribution import TrackingIndex
from recsys_assets.config import ConfigError, Settings, SurfaceConfig, load_settings
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR
from recsys_assets.rules.eligibility import CAMPAIGN_KILLED, CODE_BY_REASON, CONSENT_REVOKED
from recsys_assets.rules.person import CONSENT, EMAIL, PUSH, person_requirements
from recsys_assets.serving.decision_log import AuditRecord, DecisionLog, DecisionRecord
from recsys_assets.serving.experiments import experiments
from recsys_assets.serving.fill import Fill, RecommendedItem
from recsys_assets.serving.final_check import final_reason_codes
from recsys_assets.serving.kills import Kill, KillScope, KillSwitch
from recsys_assets.serving.metrics import ServingMetrics
from recsys_assets.serving.state import INT64_MAX, Catalog, OnlineState, ServingEvent, Subject
from recsys_assets.serving.store import STORE_OK, ListStore, PartitionLists, PublishedVersion
from recsys_assets.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys_assets.serving.rerank import CandidatePoolServing

log = logging.getLogger(__name__)

PRECOMPUTED = "precomputed"
PRECOMPUTED_STALE = "precomputed_stale"
FALLBACK = "fallback"
KILLED_FALLBACK = "killed_fallback"
EMPTY = "empty"
SERVED_FROM = (PRECOMPUTED, PRECOMPUTED_STALE, FALLBACK, KILLED_FALLBACK, EMPTY)

FINAL_SLATE = "final_slate"
FALLBACK_ONLY = "fallback_only"

# Why a request did not get (only) its own fresh list: metric label and decision-log value.
NO_LIST_FOR_SUBJECT = "no_list_for_subject"
UNKNOWN_SUBJECT = "unknown_subject"
STALE_NEVER = "stale_never_served"
STALE_BEYOND_BOUND = "stale_beyond_bound"
ALL_REJECTED = "all_rejected"
NOTHING_QUALIFIED = "nothing_qualified"
TOP_UP = "top_up"
STATE_UNAVAILABLE = "state_unavailable"
KILLED = "killed"
MODE_FALLBACK_ONLY = "serving_mode_fallback_only"

POPULAR_BY_REGION = "popular_by_region"
NEW_USER_DEFAULT = "new_user_default"
TENANT_DEFAULT_ACTIONS = "tenant_default_actions:{tenant}"
_CONSENT_REVOKED_CODE = CODE_BY_REASON[CONSENT_REVOKED]
_KILLED_CAMPAIGN_CODE = CODE_BY_REASON[CAMPAIGN_KILLED]
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
    experiment: dict[str, str] | None = None
    """`{"id", "arm"}` when the surface runs an experiment, else None."""

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
            "experiment": self.experiment,
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
    serving_mode: str

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
            serving_mode=surface.serving_mode,
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


CheckList = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""The final check of one list: (item ids, catalog positions) → reason code per item."""


@dataclass(slots=True)
class ServingContext:
    """One request as a serving mode sees it: who, where, the partition's lists taken once,
    the final check bound to this subject and moment, and the fill to put items into."""

    subject_id: int
    policy: SurfacePolicy
    region: str
    now_ns: int
    subject: Subject
    lists: PartitionLists
    catalog: Catalog
    check: CheckList
    fill: Fill
    context: Mapping[str, Any] | None


@dataclass(slots=True)
class Served:
    """What a serving mode did: the list the response is attributed to (`primary`, None
    when only fallback items or nothing were served), why the subject did not get only their
    own fresh list (`cause`), and the fallback contexts to top up from, in order."""

    fallback_keys: list[str]
    cause: str | None = None
    primary: tuple[PublishedVersion, int] | None = None
    served_from: str = EMPTY
    store_hit: bool = False
    stale_outcome: str | None = None
    fallback_served_from: str = FALLBACK
    """`served_from` when a fallback list becomes the primary one."""
    detail: dict[str, Any] | None = None
    """What the mode adds to the decision log's `context` (candidate_pool_rerank: the
    exploration seed and each served slot's source and propensity)."""


class StoredList(NamedTuple):
    """A subject's stored list a mode may serve (`RecommendationService.stored_list`)."""

    version: PublishedVersion
    index: int
    stale: bool
    served: Served


ServeMode = Callable[[ServingContext], Served]


def _logged_context(
    context: Mapping[str, Any] | None, detail: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The request's context for the decision log, with the serving mode's detail (the
    online rerank's seed and slots) under `serving_detail`."""
    if not detail:
        return dict(context) if context else None
    return {**(context or {}), "serving_detail": detail}


def _without_campaigns(
    check: CheckList,
    catalog: Catalog,
    campaigns: frozenset[str],
    item_ids: np.ndarray,
    positions: np.ndarray,
) -> np.ndarray:
    """`check`, with the items of killed `campaigns` refused too."""
    codes = check(item_ids, positions)
    codes[(codes == 0) & catalog.in_campaigns(positions, campaigns)] = _KILLED_CAMPAIGN_CODE
    return codes


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
        self.kill_switch = KillSwitch(self.warehouse, self.settings, clock=clock)
        self.metrics.watch_kills(self.kill_switch)
        self.experiments = experiments(self.settings)
        self.metrics.watch_experiment_clicks(self.attribution, self.experiments)
        self.serving_modes: dict[str, ServeMode] = {
            FINAL_SLATE: self.serve_final_slate,
            FALLBACK_ONLY: self.serve_fallback_only,
        }
        """The one place a serving mode is dispatched: mode → the function serving it."""
        self.candidate_pool: CandidatePoolServing | None = None
        """The online rerank, built only when a surface stores candidate pools: it loads
        torch (about 190 MiB), which a process serving final slates never needs."""
        if any(s.storage_mode == "candidate_pool" for s in self.settings.surfaces.values()):
            from recsys_assets.serving.rerank import (  # rerank builds on this module's types
                CANDIDATE_POOL_RERANK,
                CandidatePoolServing,
            )

            self.candidate_pool = CandidatePoolServing(
                self.warehouse, self.settings, self.metrics, clock=clock
            )
            self.serving_modes[CANDIDATE_POOL_RERANK] = partial(self.candidate_pool.serve, self)
        self._check_modes()
        self.regions = frozenset(self.settings.regions)
        self._loaded = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._request_prefix = os.urandom(4).hex()
        self._request_numbers = itertools.count(1)
        self._refresh_errors_seen = 0

    def _check_modes(self) -> None:
        """Refuse a configuration naming a serving mode this service cannot serve."""
        for name, surface in self.settings.surfaces.items():
            used = [("serving_mode", surface.serving_mode)]
            if surface.experiment is not None:
                used += [
                    (f"experiment.arms.{arm}.serving_mode", config.serving_mode)
                    for arm, config in surface.experiment.arms.items()
                ]
            for key, mode in used:
                if mode not in self.serving_modes:
                    raise ConfigError(
                        f"surfaces.{name}.{key}: serving mode {mode!r} is not available in "
                        f"this serving build (available: {sorted(self.serving_modes)})"
                    )

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> None:
        """Read state and the active lists now (the CLI's one-shot path)."""
        self.state.load()
        self._refresh_store()
        self.attribution.refresh()
        self.kill_switch.refresh()
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
        """Pick up manifest flips, kills, tombstones, a new raw snapshot and others' events
        now."""
        self.kill_switch.refresh()
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
        if self.candidate_pool is not None:
            self.candidate_pool.refresh(self.store, self.state)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # the poller must outlive a bad tick; the next one retries
                log.exception("serving: refresh failed")

    # -- events ---------------------------------------------------------------------------

    def record_events(self, events: Iterable[ServingEvent]) -> str:
        """Persist and apply user events; effective for the next request. Returns the file."""
        batch = list(events)
        path = self.state.record(batch)
        if self.candidate_pool is not None:
            self.candidate_pool.fresh.record(path, batch)
        return path

    def record_engagement(
        self, event_type: str, token: str, *, item_id: int | None = None
    ) -> str | None:
        """Attribute an open or click to its send by its tracking token (verified); returns
        the event file (None for a repeat, counted once). Raises
        `channels.attribution.AttributionError` when it cannot."""
        return self.attribution.record(event_type, token, item_id=item_id)

    # -- kill switch ----------------------------------------------------------------------

    def kill(
        self, scope: KillScope, *, reason: str, actor: str, allow_unknown_campaign: bool = False
    ) -> Kill:
        """Kill `scope` in every serving process (here at once, elsewhere within the poll
        interval) and audit it in the decision log. Raises kills.KillError for a bad scope
        (a campaign no item carries, unless `allow_unknown_campaign`)."""
        kill = self.kill_switch.kill(
            scope, reason=reason, actor=actor, allow_unknown_campaign=allow_unknown_campaign
        )
        self.decision_log.append(AuditRecord(self.clock(), "kill", kill.scope, actor, reason))
        log.warning("serving: killed %s by %s: %s", scope.describe(), actor, reason)
        return kill

    def lift(self, scope: KillScope, *, actor: str, reason: str | None = None) -> Kill:
        """Lift the kill of exactly `scope` and audit it; raises kills.NoSuchKill."""
        kill = self.kill_switch.lift(scope, actor=actor, reason=reason)
        self.decision_log.append(AuditRecord(self.clock(), "lift", scope, actor, reason))
        log.warning("serving: lifted the kill of %s by %s", scope.describe(), actor)
        return kill

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

        Not ready before the first load, while there is no item state (no raw snapshot
        was ever readable: every item would be refused) and while the kills document was
        never readable (no kill would be honoured). A missing manifest, a raw snapshot that
        vanished after loading or a kills document damaged after a good read is reported but
        keeps serving what is loaded (the kills last read stay in force).
        """
        reasons = []
        if not self._loaded:
            reasons.append("not started: lists and state are not loaded yet")
        if not self.state.ready:
            reasons.append(self.state.problem or "no item state loaded")
        warnings = [self.state.problem] if self.state.ready and self.state.problem else []
        if (kills_problem := self.kill_switch.problem) is not None:
            if self.kill_switch.ever_read:
                warnings.append(f"kill switch: {kills_problem}")
            else:
                reasons.append(f"kill switch: no kill is known, {kills_problem}")
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
        """The subject's recommendations on `surface` in `region`, checked and filled.

        The serving mode (the surface's `serving_mode`, or the subject's experiment arm)
        picks the function that serves the request, in `serving_modes`; a kill of the
        surface or region answers from the fallback lists instead, whatever the mode.
        """
        started = time.perf_counter()
        self.check_subject(subject_id)
        want = self.check_request(surface, region, limit)
        policy = self.policies[surface]
        now_ns = self.clock()
        state = self.state
        subject = state.subject(subject_id)
        catalog = state.catalog
        kills = self.kill_switch.active
        check: CheckList = partial(
            final_reason_codes,
            catalog=catalog,
            region=region,
            now_ns=now_ns,
            subject=subject,
            filters=state.filters(subject_id, surface),
            frequency_cap=policy.frequency_cap,
        )
        if kills and (campaigns := kills.killed_campaigns(surface, region)):
            check = partial(_without_campaigns, check, catalog, campaigns)
        request = ServingContext(
            subject_id,
            policy,
            region,
            now_ns,
            subject,
            self.store.lists(surface, region),
            catalog,
            check,
            Fill(want),
            context,
        )
        experiment = self.experiments.get(surface)
        assignment = experiment.assign(subject_id) if experiment is not None else None
        mode = assignment.serving_mode if assignment is not None else policy.serving_mode
        if kills and kills.partition_kill(surface, region) is not None:
            served = self.serve_killed(request)
        else:
            served = self.serving_modes[mode](request)
        self._top_up(request, served)
        fill = request.fill
        if served.primary is None and served.cause is None:
            served.cause = NOTHING_QUALIFIED

        request_id = f"{self._request_prefix}-{next(self._request_numbers)}"
        rejections = fill.rejections_by_reason()
        experiment_out = assignment.to_dict() if assignment is not None else None
        if served.primary is None:
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
                experiment_out,
            )
        else:
            source, index = served.primary
            recommendation = Recommendation(
                request_id,
                subject_id,
                surface,
                region,
                source.list_ids[index],
                source.version,
                served.served_from,
                source.iso(int(source.generated_at_ns[index])),
                source.iso(int(source.expires_at_ns[index])),
                source.model_versions[index] or None,
                fill.items,
                rejections,
                experiment_out,
            )
        latency_s = time.perf_counter() - started
        self.metrics.observe(
            surface=surface,
            region=region,
            model_version=recommendation.model_version or "none",
            served_from=recommendation.served_from,
            store_hit=served.store_hit,
            stale_outcome=served.stale_outcome,
            fallback_cause=served.cause,
            rejections=rejections,
            items_checked=fill.checked,
            latency_s=latency_s,
        )
        if assignment is not None:
            self.metrics.observe_arm(
                surface=surface,
                experiment=assignment.experiment_id,
                arm=assignment.arm,
                served_from=recommendation.served_from,
                rejections=rejections,
                items_checked=fill.checked,
                latency_s=latency_s,
            )
        self.decision_log.append(
            DecisionRecord(
                now_ns,
                recommendation,
                served.cause,
                limit,
                _logged_context(context, served.detail),
                latency_s * 1e6,
                mode,
                assignment,
            )
        )
        return recommendation

    # -- serving modes ----------------------------------------------------------------------

    def person_gate(self, request: ServingContext, *, slate_only: bool = False) -> Served | None:
        """What every mode must answer before reading any list: no item state (nothing can
        be checked), an unknown recipient of a message, or a subject without consent (their
        list, or with `slate_only` its stored slate, is refused whole). None when the
        subject may get their own list."""
        policy, subject = request.policy, request.subject
        if not self.state.ready:  # nothing can be checked: never serve blindly
            return Served(cause=STATE_UNAVAILABLE, fallback_keys=[])
        if not subject.known and policy.messaging:
            return Served(cause=UNKNOWN_SUBJECT, fallback_keys=[])
        if subject.known and not self._consented(policy, subject):
            version = request.lists.personalized
            index = version.find_subject(request.subject_id) if version is not None else -1
            if version is not None and index >= 0:
                request.fill.reject_all(
                    version, index, _CONSENT_REVOKED_CODE, slate_only=slate_only
                )
            if policy.messaging:
                keys = []
            elif policy.enterprise:  # the tenant's default actions are not personal
                keys = self._fallback_keys(request)[0]
            else:
                keys = [POPULAR_BY_REGION, NEW_USER_DEFAULT]
            return Served(cause=CONSENT_REVOKED, fallback_keys=keys)
        return None

    def stored_list(self, request: ServingContext) -> StoredList | Served:
        """The subject's stored list if the surface's stale policy lets it be served (with
        the answer to build on, topped up from the fallback lists), else the answer without
        it: no version, no list for the subject, stale where the policy says never or beyond
        its bound. Every mode that serves a stored list starts here."""
        top_up_keys, fallback_keys = self._fallback_keys(request)
        policy, lists, now_ns = request.policy, request.lists, request.now_ns
        version = lists.personalized
        if version is None:
            return Served(cause=lists.personalized_status, fallback_keys=fallback_keys)
        index = version.find_subject(request.subject_id)
        if index < 0:
            return Served(cause=NO_LIST_FOR_SUBJECT, fallback_keys=fallback_keys)
        expires_at_ns = int(version.expires_at_ns[index])
        stale = now_ns > expires_at_ns
        if stale and policy.stale_mode == "never":
            return Served(cause=STALE_NEVER, fallback_keys=[], stale_outcome="empty")
        if stale and now_ns - expires_at_ns > policy.max_stale_ns:
            return Served(
                cause=STALE_BEYOND_BOUND, fallback_keys=fallback_keys, stale_outcome="fallback"
            )
        served = Served(
            fallback_keys=top_up_keys, stale_outcome="served_with_check" if stale else None
        )
        return StoredList(version, index, stale, served)

    def serve_final_slate(self, request: ServingContext) -> Served:
        """`final_slate`: the subject's stored slate under the stale policy, checked and
        filled, topped up from the fallback lists. On a candidate-pool surface that is the
        shortlist's `in_slate` rows only: its deeper candidates never went through the batch
        slate policy (caps, exploration), so serving them would not be the stored slate."""
        gated = self.person_gate(request, slate_only=True)
        if gated is not None:
            return gated
        stored = self.stored_list(request)
        if isinstance(stored, Served):
            return stored
        version, list_index, stale, served = stored
        positions = version.positions_in(request.catalog.arrays)
        if request.fill.take(version, list_index, request.check, positions, slate_only=True):
            served.primary = (version, list_index)
            served.served_from = PRECOMPUTED_STALE if stale else PRECOMPUTED
            served.store_hit = True
        else:
            served.cause = ALL_REJECTED
        return served

    def serve_fallback_only(self, request: ServingContext) -> Served:
        """`fallback_only`: the non-personalized fallback lists, with the final check."""
        gated = self.person_gate(request)
        if gated is not None:
            return gated
        return Served(cause=MODE_FALLBACK_ONLY, fallback_keys=self._fallback_keys(request)[1])

    def serve_killed(self, request: ServingContext) -> Served:
        """A killed surface or region: the fallback lists (`served_from: killed_fallback`),
        under the same person rules as any fallback."""
        served = self.person_gate(request) or Served(
            cause=KILLED, fallback_keys=self._fallback_keys(request)[1]
        )
        served.fallback_served_from = KILLED_FALLBACK
        return served

    def _fallback_keys(self, request: ServingContext) -> tuple[list[str], list[str]]:
        """(top-up keys after the subject's own list, keys when there is no own list)."""
        policy, subject = request.policy, request.subject
        tenant_key = (
            [TENANT_DEFAULT_ACTIONS.format(tenant=subject.tenant_id)] if subject.tenant_id else []
        )
        if policy.enterprise:
            return tenant_key, tenant_key
        return [POPULAR_BY_REGION], [NEW_USER_DEFAULT, POPULAR_BY_REGION]

    def _top_up(self, request: ServingContext, served: Served) -> None:
        """Fill what is left from the fallback lists in `served.fallback_keys` order."""
        fallback = request.lists.fallback
        if fallback is None:
            return
        fill, policy, now_ns = request.fill, request.policy, request.now_ns
        for key in served.fallback_keys:
            if fill.full:
                break
            index = fallback.find_context(key)
            if index < 0 or not policy.usable(int(fallback.expires_at_ns[index]), now_ns):
                continue
            positions = fallback.positions_in(request.catalog.arrays)
            if not fill.take(fallback, index, request.check, positions):
                continue
            if served.primary is None:
                served.primary = (fallback, index)
                served.served_from = served.fallback_served_from
            elif served.cause is None:
                served.cause = TOP_UP

    @staticmethod
    def _consented(policy: SurfacePolicy, subject: Subject) -> bool:
        return (
            (not policy.requires_consent or subject.consent_personalization)
            and (not policy.requires_email or subject.email_subscribed)
            and (not policy.requires_push or subject.push_enabled)
        )
