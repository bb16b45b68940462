"""Candidate-pool serving (`serving_mode: candidate_pool_rerank`): the online rerank.

For a `storage_mode: candidate_pool` surface publish stores a shortlist per subject
(publish/shortlists.py): the batch slate first, then the best of the rest of the pool, each
row with the ranker's inputs as batch gathered them. A request, in order:

1. **Fetch** the subject's shortlist from the active version (the same immutable version the
   list store serves, so a publish flip cannot mix versions) under the surface's stale policy.
2. **Final check** every candidate in one batch (serving/final_check.py, the same rules as
   every list), and the fresh overlay candidates (3.) with it.
3. **Fresh overlays**: candidates from fresh sources — trending in the region within
   `overlay_window` (serving events), items created after the list was generated, and the
   session items' neighbours (same creator) — with provenance `overlay_<source>`.
4. **Fresh features**: the engagements and exposures since generation (serving events,
   serving/fresh.py) and the request's context (`session_item_ids` count as engagements now,
   `category_intent` as `intent_weight` engagements in that category) are added to the
   counts the batch gather looked up; the derived features are recomputed by the batch
   gather's own `derive_cross_features`.
5. **Rerank** with the bundle's ranker and calibrator (the model that scored the batch,
   `model_version` of the list; a small MLP, cheap on the CPU). The utility keeps batch's
   components: every utility component but the sponsored boost is proportional to the
   calibrated relevance (pipeline/scoring.py), so a candidate's batch utility is rescaled by
   its new relevance over its batch relevance.
6. **Slate policy online** (`pipeline.slates.select_slates`, the batch implementation): caps,
   high confidence first, and exploration drawn from the precomputed exploration candidates
   with a fresh seed per request; the seed and each served slot's propensity go to the
   decision log. Overlays take `round(overlay_share × limit)` slots (fewer when fewer
   qualify), merged in the policy's order.

Every step runs against `latency_budget_ms`: past it the request serves the shortlist in
batch order (the stored slate first) with the same final check, and the metric
`recsys_candidate_pool_requests_total{outcome="budget_exceeded"}` counts it.

torch (about 190 MiB resident) is imported when `CandidatePoolServing` is built for a
candidate-pool surface, not with this module: the HTTP API imports it for the request
context's limits, and a process serving only final slates never loads torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client import Counter as MetricCounter
from prometheus_client import Histogram

from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.models.calibration import Calibrator
from recsys_assets.pipeline.feature_tables import derive_cross_features
from recsys_assets.pipeline.features import (
    FEATURE_COLUMNS,
    FEATURE_SET_VERSION,
    USER_FEATURES,
    source_features,
)
from recsys_assets.pipeline.scoring import SPONSORED_BOOST
from recsys_assets.pipeline.slates import REASON_EXPLORATION, SlateCandidates, select_slates
from recsys_assets.publish.lists import SHORTLIST_COLUMNS, SHORTLIST_FEATURE_COLUMNS
from recsys_assets.rules.categories import category_capped
from recsys_assets.serving.fresh import EXPOSURE, FreshItems, FreshSignals
from recsys_assets.serving.metrics import ServingMetrics
from recsys_assets.serving.service import (
    ALL_REJECTED,
    PRECOMPUTED,
    PRECOMPUTED_STALE,
    Served,
    ServingContext,
    ServingRequestError,
)
from recsys_assets.serving.state import OnlineState
from recsys_assets.serving.store import (
    PERSONALIZED_CONTEXT,
    ListStore,
    PublishedVersion,
)
from recsys_assets.warehouse import Warehouse

if TYPE_CHECKING:
    from recsys_assets.models.ranker import RankerModel
    from recsys_assets.serving.service import RecommendationService

log = logging.getLogger(__name__)

CANDIDATE_POOL_RERANK = "candidate_pool_rerank"
RERANKED = "reranked"
BUDGET_EXCEEDED = "budget_exceeded"
NO_SHORTLIST = "no_shortlist"
OVERLAY_TRENDING = "overlay_trending"
OVERLAY_NEW_ITEM = "overlay_new_item"
OVERLAY_SESSION = "overlay_session_neighbour"
OVERLAY_RANK_COLUMNS = {
    OVERLAY_TRENDING: "rank_trending",
    OVERLAY_NEW_ITEM: "rank_new_item_exploration",
    OVERLAY_SESSION: "rank_item_to_item",
}
"""The batch source whose ranker inputs an overlay candidate gets (its rank in its source)."""
POLICY_DEPTH_PER_SLOT = 3
"""The online slate policy sees this many candidates per displayed slot (`_policy_order`)."""
MAX_SESSION_ITEMS = 50
_COLUMN = {name: index for index, name in enumerate(FEATURE_COLUMNS)}
_SOURCE_COLUMNS = [_COLUMN[name] for name in source_features(pd.DataFrame({"item_id": [0]}))]
"""Where the features read off a candidate row (`features.source_features`) sit."""
_DAY_NS = 86_400 * 1_000_000_000
_WEEK_NS = 7 * _DAY_NS
SHORTLIST_ROW = np.dtype(
    [
        ("features", "<f4", (len(FEATURE_COLUMNS),)),
        ("category_code", "<i4"),
        ("creator_code", "<i4"),
        ("is_sponsored", "?"),
        ("is_exploration_candidate", "?"),
        ("in_slate", "?"),
    ]
)
"""What the rerank reads of one shortlist row, beside the list store's own row."""


class InvalidContext(ServingRequestError):
    """A request context the rerank cannot use; the message names the field."""

    status_code = 422


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What the product knows about this visit: items of the session, a category intent."""

    session_item_ids: tuple[int, ...] = ()
    category_intent: str | None = None

    @classmethod
    def parse(cls, context: Mapping[str, Any] | None) -> RequestContext:
        if not context:
            return cls()
        session = context.get("session_item_ids") or ()
        if isinstance(session, str | bytes) or not isinstance(session, list | tuple):
            raise InvalidContext(f"session_item_ids must be a list of item ids, got {session!r}")
        if len(session) > MAX_SESSION_ITEMS:
            raise InvalidContext(
                f"session_item_ids holds {len(session)} ids; at most {MAX_SESSION_ITEMS}"
            )
        for value in session:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidContext(f"session_item_ids: {value!r} is not an item id")
        intent = context.get("category_intent")
        if intent is not None and (not isinstance(intent, str) or not intent):
            raise InvalidContext(f"category_intent must be a category name, got {intent!r}")
        return cls(tuple(session), intent)


class ShortlistRows:
    """The rerank's view of one loaded shortlist version: per row (in the list store's row
    order) the features and the policy's item attributes, in a local file read per request
    with one `pread`, like the list store's own rows."""

    def __init__(self, warehouse: Warehouse, version: PublishedVersion) -> None:
        self.version = version
        self.categories: dict[str, int] = {}
        self.creators: dict[str, int] = {}
        self._file = tempfile.TemporaryFile(prefix=f"recsys-shortlist-{version.version}-")  # noqa: SIM115
        model_versions: set[str] = set()
        rows = 0
        subjects: list[np.ndarray] = []
        location = warehouse.path(f"{version.path}/lists.parquet")
        with warehouse.fs.open(location, "rb") as handle:
            reader = pq.ParquetFile(handle)
            missing = [c for c in SHORTLIST_COLUMNS if c not in reader.schema_arrow.names]
            if missing:
                raise ValueError(
                    f"{version.path} is not a candidate_pool shortlist (no {missing[:3]}…): "
                    "publish the surface with storage_mode: candidate_pool"
                )
            columns = ["subject_id", "context_key", "model_version", *SHORTLIST_COLUMNS]
            for batch in reader.iter_batches(batch_size=65_536, columns=columns):
                keys = batch.column("context_key").cast(pa.string())
                batch = batch.filter(pc.equal(keys, PERSONALIZED_CONTEXT))
                if batch.num_rows == 0:
                    continue
                packed = np.empty(batch.num_rows, dtype=SHORTLIST_ROW)
                packed["features"] = np.column_stack(
                    [
                        batch.column(name).to_numpy(zero_copy_only=False)
                        for name in SHORTLIST_FEATURE_COLUMNS
                    ]
                ).astype(np.float32)
                packed["category_code"] = _codes(batch.column("category"), self.categories)
                packed["creator_code"] = _codes(batch.column("creator_id"), self.creators)
                for flag in ("is_sponsored", "is_exploration_candidate", "in_slate"):
                    packed[flag] = batch.column(flag).to_numpy(zero_copy_only=False)
                self._file.write(packed.data)
                subjects.append(batch.column("subject_id").to_numpy(zero_copy_only=False))
                model_versions.update(pc.unique(batch.column("model_version")).to_pylist())
                rows += batch.num_rows
        self._file.flush()
        order = np.concatenate([np.empty(0, np.int64), *subjects])
        if rows != version.row_count or not np.array_equal(
            order[version.starts[:-1]], version.subject_ids
        ):
            raise ValueError(
                f"{version.path}: shortlist rows are not in the list store's order "
                "(subject, position); republish the partition"
            )
        self.model_versions = frozenset(str(v) for v in model_versions if v)
        self.category_capped = category_capped(pd.Series(list(self.categories)))

    def rows(self, start: int, stop: int) -> np.ndarray:
        size = SHORTLIST_ROW.itemsize
        return np.frombuffer(
            os.pread(self._file.fileno(), (stop - start) * size, start * size), dtype=SHORTLIST_ROW
        )

    def category_code(self, name: str) -> int:
        """The version's code of category `name`, or -1 when none of its rows has it."""
        return self.categories.get(name, -1)


def _codes(column: pa.Array, index: dict[str, int]) -> np.ndarray:
    values = column.cast(pa.string()).fill_null("").to_pylist()
    return np.fromiter((index.setdefault(v, len(index)) for v in values), np.int32, len(values))


@dataclass(frozen=True)
class OnlineRanker:
    """The bundle's ranker and calibrator, loaded alone (retrieval models stay in batch)."""

    model_version: str
    ranker: RankerModel
    calibrator: Calibrator

    @classmethod
    def load(cls, warehouse: Warehouse, model_version: str) -> OnlineRanker:
        import torch  # the bundle's modules load torch: only once a ranker is needed

        from recsys_assets.models.bundle import CALIBRATION_FILE, MODELS_PREFIX, RANKER_FILE
        from recsys_assets.models.ranker import RankerModel

        folder = f"{MODELS_PREFIX}/{model_version}"
        ranker = RankerModel.from_bytes(
            warehouse.read_bytes(f"{folder}/{RANKER_FILE}"), device=torch.device("cpu")
        )
        calibrator = Calibrator.from_json(warehouse.read_bytes(f"{folder}/{CALIBRATION_FILE}"))
        loaded = cls(model_version, ranker, calibrator)
        # The first call into torch pays its set-up (tens of ms): here, not in a request.
        loaded.score(np.zeros((1, len(FEATURE_COLUMNS)), dtype=np.float32))
        return loaded

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Calibrated P(engage) per row of a FEATURE_COLUMNS matrix."""
        prediction = self.ranker.predict_matrix(
            matrix, columns=tuple(FEATURE_COLUMNS), feature_set_version=FEATURE_SET_VERSION
        )
        return np.clip(self.calibrator.transform(prediction), 0.0, 1.0)


@dataclass
class _Candidates:
    """The candidates of one request that passed the final check, shortlist then overlays."""

    item_ids: np.ndarray
    features: np.ndarray
    category_code: np.ndarray
    creator_code: np.ndarray
    sponsored: np.ndarray
    exploration: np.ndarray
    batch_utility: np.ndarray
    batch_calibrated: np.ndarray
    provenance: list[tuple[str, ...]]
    reasons: list[tuple[str, ...]]
    overlay: np.ndarray


class CandidatePoolServing:
    """Shortlists, rankers and fresh signals of the candidate-pool surfaces, kept current by
    `refresh` (the service's poll) and `record` (this process's events)."""

    def __init__(
        self,
        warehouse: Warehouse,
        settings: Settings,
        metrics: ServingMetrics,
        *,
        clock: Any = time.time_ns,
    ) -> None:
        self.warehouse = warehouse
        self.settings = settings
        self.clock = clock
        self.surfaces = {
            name: surface
            for name, surface in settings.surfaces.items()
            if surface.storage_mode == "candidate_pool"
        }
        horizon = max(
            (
                max(s.ttl + s.stale_policy.max_stale, s.candidate_pool.overlay_window)
                for s in self.surfaces.values()
            ),
            default=pd.Timedelta(hours=1),
        )
        window = min(
            (s.candidate_pool.overlay_window for s in self.surfaces.values()),
            default=pd.Timedelta(hours=1),
        )
        self.fresh = FreshSignals(
            warehouse,
            horizon_ns=int(pd.Timedelta(horizon).value),
            trending_window_ns=int(pd.Timedelta(window).value),
            trending_items=max(
                (s.candidate_pool.overlay_candidates for s in self.surfaces.values()), default=1
            ),
            clock=clock,
        )
        if self.surfaces:
            import torch

            # A request scores a few hundred rows: intra-op threads only add synchronisation
            # (8 ms instead of 0.8 ms per request on two busy cores; ranker.py saw the same
            # when training).
            torch.set_num_threads(1)
        self.items: FreshItems | None = None
        self._overlay_source_features = {
            name: _overlay_source_features(surface.candidate_pool.overlay_candidates)
            for name, surface in self.surfaces.items()
        }
        self._shortlists: dict[tuple[str, str], ShortlistRows] = {}
        self._rankers: dict[str, OnlineRanker] = {}
        self.load_errors = 0
        registry = metrics.registry
        self.requests = MetricCounter(
            "recsys_candidate_pool_requests_total",
            "Candidate-pool requests by outcome: reranked, budget_exceeded (served in batch "
            "order), no_shortlist (the version's shortlist or model is not loaded)",
            ["surface", "region", "outcome"],
            registry=registry,
        )
        self.rerank_seconds = Histogram(
            "recsys_candidate_pool_rerank_seconds",
            "Time of the online rerank (check, fresh features, model, slate policy)",
            ["surface"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )
        self.overlay_items = MetricCounter(
            "recsys_candidate_pool_overlay_items_total",
            "Items served from fresh overlays, by source",
            ["surface", "source"],
            registry=registry,
        )

    # -- keeping current --------------------------------------------------------------------

    def refresh(self, store: ListStore, state: OnlineState) -> None:
        """Load the shortlists and rankers of newly active versions, the catalog's fresh
        items after a new snapshot, and other replicas' events."""
        if not self.surfaces:
            return
        for surface in self.surfaces:
            for region in self.settings.surface_regions(surface):
                version = store.lists(surface, region).personalized
                loaded = self._shortlists.get((surface, region))
                if version is None or (loaded is not None and loaded.version is version):
                    continue
                try:
                    shortlist = ShortlistRows(self.warehouse, version)
                    for model_version in shortlist.model_versions - set(self._rankers):
                        self._rankers[model_version] = OnlineRanker.load(
                            self.warehouse, model_version
                        )
                except Exception as error:  # serve the batch order until a version loads
                    self.load_errors += 1
                    log.warning(
                        "candidate pool %s/%s version %s not loaded: %s",
                        surface,
                        region,
                        version.version,
                        error,
                    )
                    continue
                self._shortlists[(surface, region)] = shortlist
        if state.ready and (self.items is None or self.items.snapshot_id != state.snapshot_id):
            self.items = FreshItems.load(self.warehouse, state.snapshot_id)
        self.fresh.sync()

    # -- serving ----------------------------------------------------------------------------

    def serve(self, service: RecommendationService, request: ServingContext) -> Served:
        """`candidate_pool_rerank` for one request (the module docstring's steps)."""
        context = RequestContext.parse(request.context)
        gated = service.person_gate(request)
        if gated is not None:
            return gated
        stored = service.stored_list(request)
        if isinstance(stored, Served):
            return stored
        version, index, stale, served = stored
        policy = request.policy
        surface = self.surfaces[policy.name]
        shortlist = self._shortlists.get((policy.name, request.region))
        started = time.perf_counter()
        outcome = NO_SHORTLIST
        if shortlist is not None and shortlist.version is version:
            ranker = self._rankers.get(version.model_versions[index] or "")
            if ranker is not None:
                decision = self._rerank(
                    surface, request, version, index, shortlist, ranker, context, started
                )
                outcome = RERANKED if decision is not None else BUDGET_EXCEEDED
                if decision is not None:
                    served.detail = decision
        if outcome != RERANKED:
            positions = version.positions_in(request.catalog.arrays)
            request.fill.take(version, index, request.check, positions)
        else:
            self.rerank_seconds.labels(policy.name).observe(time.perf_counter() - started)
        self.requests.labels(policy.name, request.region, outcome).inc()
        if request.fill.items:
            served.primary = (version, index)
            served.served_from = PRECOMPUTED_STALE if stale else PRECOMPUTED
            served.store_hit = True
        else:
            served.cause = ALL_REJECTED
        return served

    def _rerank(
        self,
        surface: SurfaceConfig,
        request: ServingContext,
        version: PublishedVersion,
        index: int,
        shortlist: ShortlistRows,
        ranker: OnlineRanker,
        context: RequestContext,
        started: float,
    ) -> dict[str, Any] | None:
        """Rerank and fill; None (nothing filled) when the latency budget ran out first."""
        budget_s = surface.candidate_pool.latency_budget_ms / 1000.0
        candidates, codes = self._checked_candidates(
            surface, request, version, index, shortlist, context
        )
        if time.perf_counter() - started > budget_s:
            return None
        if len(candidates.item_ids) == 0:  # every candidate refused: nothing to rank
            request.fill.count_checked(codes)
            return {"outcome": RERANKED, "exploration_seed": None, "slots": []}
        generated_ns = int(version.generated_at_ns[index])
        self._freshen(candidates, shortlist, request, surface, context, generated_ns)
        calibrated = ranker.score(candidates.features)
        utility = _online_utility(candidates, calibrated)
        if time.perf_counter() - started > budget_s:
            return None
        want = request.fill.want
        overlay_slots = min(
            round(surface.candidate_pool.overlay_share * want),
            int(candidates.overlay.sum()),
        )
        seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        order, explored, propensity = _policy_order(
            candidates,
            utility,
            calibrated,
            shortlist,
            surface,
            seed,
            request.subject_id,
            overlay_slots,
        )
        chosen = _with_overlay_share(order, candidates.overlay, want, overlay_slots)
        if time.perf_counter() - started > budget_s:
            return None
        request.fill.count_checked(codes)
        slots = []
        for row in chosen.tolist():
            reasons = candidates.reasons[row]
            if explored[row]:
                reasons = (*reasons, REASON_EXPLORATION)
            item_id = int(candidates.item_ids[row])
            request.fill.add(
                item_id,
                score=float(calibrated[row]),
                utility=float(utility[row]),
                reason_codes=reasons,
                source_provenance=candidates.provenance[row],
            )
            slots.append(
                {
                    "position": len(slots) + 1,
                    "item_id": item_id,
                    "source": candidates.provenance[row][0] if candidates.provenance[row] else "",
                    "exploration": bool(explored[row]),
                    "propensity": float(propensity[row]),
                }
            )
        for slot in slots:
            if slot["source"].startswith("overlay_"):
                self.overlay_items.labels(surface.name, slot["source"]).inc()
        return {"outcome": RERANKED, "exploration_seed": seed, "slots": slots}

    def _checked_candidates(
        self,
        surface: SurfaceConfig,
        request: ServingContext,
        version: PublishedVersion,
        index: int,
        shortlist: ShortlistRows,
        context: RequestContext,
    ) -> tuple[_Candidates, np.ndarray]:
        """The shortlist and the overlay candidates, final-checked in one batch each."""
        start, stop = int(version.starts[index]), int(version.starts[index + 1])
        stored = version.rows(start, stop)
        extra = shortlist.rows(start, stop)
        item_ids = stored["item_id"]
        catalog = request.catalog
        codes = request.check(item_ids, version.positions_in(catalog.arrays)[start:stop])
        overlay_ids, overlay_sources = self._overlay_candidates(
            surface, request, version, index, set(item_ids.tolist()), context
        )
        overlay_codes = request.check(overlay_ids, catalog.arrays.positions(overlay_ids))
        kept = np.flatnonzero(codes == 0)
        kept_overlay = np.flatnonzero(overlay_codes == 0)
        features = np.empty((kept.size + kept_overlay.size, len(FEATURE_COLUMNS)), np.float32)
        features[: kept.size] = extra["features"][kept]
        reason_values, provenance_values = version.reason_values, version.provenance_values
        candidates = _Candidates(
            item_ids=np.concatenate((item_ids[kept], overlay_ids[kept_overlay])),
            features=features,
            category_code=np.concatenate(
                (extra["category_code"][kept], np.full(kept_overlay.size, -1, np.int32))
            ),
            creator_code=np.concatenate(
                (extra["creator_code"][kept], np.full(kept_overlay.size, -1, np.int32))
            ),
            sponsored=np.concatenate(
                (extra["is_sponsored"][kept], np.zeros(kept_overlay.size, bool))
            ),
            exploration=np.concatenate(
                (extra["is_exploration_candidate"][kept], np.zeros(kept_overlay.size, bool))
            ),
            batch_utility=np.concatenate(
                (stored["score"][kept], np.full(kept_overlay.size, np.nan))
            ),
            batch_calibrated=np.concatenate(
                (stored["calibrated"][kept], np.full(kept_overlay.size, np.nan))
            ),
            provenance=[provenance_values[c] for c in stored["provenance_code"][kept].tolist()]
            + [(overlay_sources[i],) for i in kept_overlay.tolist()],
            reasons=[reason_values[c] for c in stored["reason_code"][kept].tolist()]
            + [(overlay_sources[i],) for i in kept_overlay.tolist()],
            overlay=np.concatenate((np.zeros(kept.size, bool), np.ones(kept_overlay.size, bool))),
        )
        if kept_overlay.size:
            self._overlay_rows(
                candidates,
                kept.size,
                overlay_sources,
                kept_overlay,
                shortlist,
                request,
                surface.name,
            )
        return candidates, np.concatenate((codes, overlay_codes))

    def _overlay_candidates(
        self,
        surface: SurfaceConfig,
        request: ServingContext,
        version: PublishedVersion,
        index: int,
        listed: set[int],
        context: RequestContext,
    ) -> tuple[np.ndarray, list[str]]:
        """Fresh candidates not in the shortlist, each with its overlay source."""
        config = surface.candidate_pool
        if config.overlay_share <= 0:
            return np.empty(0, np.int64), []
        sources: list[tuple[str, list[int]]] = [
            (
                OVERLAY_TRENDING,
                list(self.fresh.trending(request.region))[: config.overlay_candidates],
            )
        ]
        if self.items is not None:
            generated_ns = int(version.generated_at_ns[index])
            sources.append(
                (
                    OVERLAY_NEW_ITEM,
                    self.items.created_after(generated_ns, config.overlay_candidates).tolist(),
                )
            )
            if context.session_item_ids:
                positions = request.catalog.arrays.positions(
                    np.array(context.session_item_ids, np.int64)
                )
                creators = {request.catalog.creator_of[p] for p in positions.tolist() if p >= 0}
                sources.append(
                    (
                        OVERLAY_SESSION,
                        self.items.neighbours(creators, config.overlay_candidates).tolist(),
                    )
                )
        exclude = listed | set(context.session_item_ids)
        ids: list[int] = []
        labels: list[str] = []
        for source, found in sources:
            for item_id in found:
                if item_id not in exclude:
                    exclude.add(item_id)
                    ids.append(item_id)
                    labels.append(source)
        return np.array(ids, dtype=np.int64), labels

    def _overlay_rows(
        self,
        candidates: _Candidates,
        first: int,
        sources: list[str],
        kept: np.ndarray,
        shortlist: ShortlistRows,
        request: ServingContext,
        surface_name: str,
    ) -> None:
        """Ranker inputs of the overlay candidates (rows `first:`): the subject's features
        from the shortlist, the item's from the catalog (age, stock, sponsored, its fresh
        engagements in the region as a lower bound of its event counts), and the source
        features of the batch source it stands in for (its rank in the overlay source)."""
        rows = candidates.features[first:]
        rows[:] = 0.0
        if first:
            for name in USER_FEATURES:
                rows[:, _COLUMN[name]] = candidates.features[0, _COLUMN[name]]
        item_ids = candidates.item_ids[first:]
        if self.items is not None and len(self.items.item_ids):
            created_ns, stock, sponsored = self.items.attributes(item_ids)
            rows[:, _COLUMN["item_age_days"]] = np.maximum(request.now_ns - created_ns, 0) / _DAY_NS
            rows[:, _COLUMN["item_stock"]] = stock
            rows[:, _COLUMN["item_is_sponsored"]] = sponsored
            candidates.sponsored[first:] = sponsored
        # Checked items are in the catalog: their category and creator by catalog position.
        places = request.catalog.arrays.positions(item_ids).tolist()
        catalog = request.catalog
        candidates.category_code[first:] = [
            shortlist.categories.get(catalog.category_of[p], -1) for p in places
        ]
        candidates.creator_code[first:] = [
            shortlist.creators.get(catalog.creator_of[p], -1) for p in places
        ]
        trending = self.fresh.trending(request.region)
        fresh_counts = np.array([trending.get(i, 0) for i in item_ids.tolist()], np.float32)
        for name in ("item_events_1d", "item_events_7d", "item_events_28d", "item_events_total"):
            rows[:, _COLUMN[name]] = fresh_counts
        source_rows = self._overlay_source_features[surface_name]
        rank_in_source: Counter[str] = Counter()
        for row, index in enumerate(kept.tolist()):
            source = sources[index]
            rank_in_source[source] += 1
            rows[row, _SOURCE_COLUMNS] = source_rows[source][rank_in_source[source] - 1]

    def _freshen(
        self,
        candidates: _Candidates,
        shortlist: ShortlistRows,
        request: ServingContext,
        surface: SurfaceConfig,
        context: RequestContext,
        generated_ns: int,
    ) -> None:
        """Add what happened since generation to the batch-gathered counts, in place."""
        features = candidates.features
        catalog = request.catalog
        now_ns = request.now_ns
        engaged: list[int] = []
        clicks = purchases = 0
        latest = None
        shown: Counter[int] = Counter()
        shown_day: Counter[int] = Counter()
        for event in self.fresh.person_events(request.subject_id, generated_ns):
            if event.type == EXPOSURE:
                if event.surface == surface.name and event.ts_ns > now_ns - _WEEK_NS:
                    shown[event.item_id] += 1
                    if event.ts_ns > now_ns - _DAY_NS:
                        shown_day[event.item_id] += 1
                continue
            engaged.append(event.item_id)
            clicks += event.type == "click"
            purchases += event.type == "purchase"
            latest = event.ts_ns if latest is None else max(latest, event.ts_ns)
        engaged.extend(context.session_item_ids)
        if context.session_item_ids:
            latest = now_ns
        positions = catalog.arrays.positions(np.array(engaged, dtype=np.int64))
        category_events: Counter[str] = Counter()
        creator_events: Counter[str] = Counter()
        for position in positions.tolist():
            if position >= 0:
                category_events[catalog.category_of[position]] += 1
                creator_events[catalog.creator_of[position]] += 1
        intent = surface.candidate_pool.intent_weight if context.category_intent else 0.0
        if context.category_intent:
            category_events[context.category_intent] += intent
        added = len(engaged) + intent
        column = {name: features[:, index] for name, index in _COLUMN.items()}
        if added:
            column["user_events_total"] += added
            column["user_events_7d"] += added
            column["user_clicks_total"] += clicks
            column["user_purchases_total"] += purchases
            if latest is not None:
                days = max(now_ns - latest, 0) / _DAY_NS
                since = column["user_days_since_last_activity"]
                np.minimum(since, days, out=since)
            column["user_category_events"] += _per_code(
                category_events, shortlist.categories, candidates.category_code
            )
            column["user_creator_events"] += _per_code(
                creator_events, shortlist.creators, candidates.creator_code
            )
        if shown:
            ids = candidates.item_ids.tolist()
            column["shown_7d"] += np.array([shown.get(i, 0) for i in ids], np.float32)
            column["shown_24h"] += np.array([shown_day.get(i, 0) for i in ids], np.float32)
        overlay = candidates.overlay
        column["item_age_days"][~overlay] += max(now_ns - generated_ns, 0) / _DAY_NS
        derive_cross_features(column)


def _overlay_source_features(ranks: int) -> dict[str, np.ndarray]:
    """Per overlay source, the source features (`features.source_features`, the batch
    code) of a candidate at each rank 1..`ranks` of the batch source it stands in for:
    computed once, looked up per request."""
    found = {}
    for source, column in OVERLAY_RANK_COLUMNS.items():
        features = source_features(pd.DataFrame({column: np.arange(1, ranks + 1)}))
        found[source] = np.column_stack(
            [features[FEATURE_COLUMNS[index]] for index in _SOURCE_COLUMNS]
        ).astype(np.float32)
    return found


def _per_code(counts: Counter[str], codes: dict[str, int], row_codes: np.ndarray) -> np.ndarray:
    """Per row, the count of its category (creator) code in `counts`."""
    by_code = np.zeros(len(codes) + 1, dtype=np.float32)
    for name, count in counts.items():
        code = codes.get(name)
        if code is not None:
            by_code[code] = count
    return by_code[np.where(row_codes >= 0, row_codes, len(codes))]


def _online_utility(candidates: _Candidates, calibrated: np.ndarray) -> np.ndarray:
    """Batch utility with the relevance-proportional components rescaled to the new
    relevance; an overlay candidate (no batch utility) gets its relevance and boost."""
    boost = np.where(candidates.sponsored, SPONSORED_BOOST, 0.0)
    before = candidates.batch_calibrated
    scale = np.divide(
        candidates.batch_utility - boost,
        before,
        out=np.ones_like(before),
        where=np.isfinite(before) & (before > 0),
    )
    scale = np.where(np.isfinite(scale), scale, 1.0)
    return calibrated * scale + boost


def _policy_order(
    candidates: _Candidates,
    utility: np.ndarray,
    calibrated: np.ndarray,
    shortlist: ShortlistRows,
    surface: SurfaceConfig,
    seed: int,
    subject_id: int,
    overlay_slots: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate rows in the order the slate policy lays them out, and per candidate row
    whether it was explored and its propensity (1.0 when not drawn).

    The policy sees the best `POLICY_DEPTH_PER_SLOT × display_count` candidates by utility,
    every exploration candidate (the pool draws are over) and the best
    `POLICY_DEPTH_PER_SLOT × overlay_slots` overlays: a greedy cap decides a row from the
    rows ranked above it only, so the top rows' decisions are those of the whole shortlist,
    at a fraction of the work. Should that leave the display short, every candidate goes in.
    """
    size = len(candidates.item_ids)
    depth = POLICY_DEPTH_PER_SLOT * surface.display_count
    rows = np.arange(size)
    if size > depth:
        overlays = np.flatnonzero(candidates.overlay)
        best_overlays = overlays[np.argsort(-utility[overlays], kind="stable")]
        rows = np.union1d(
            np.argpartition(-utility, depth - 1)[:depth],
            np.concatenate(
                (
                    np.flatnonzero(candidates.exploration),
                    best_overlays[: POLICY_DEPTH_PER_SLOT * overlay_slots],
                )
            ),
        )
    order, explored, propensity = _select(
        candidates, rows, utility, calibrated, shortlist, surface, seed, subject_id
    )
    if len(order) < surface.display_count and len(rows) < size:
        order, explored, propensity = _select(
            candidates, np.arange(size), utility, calibrated, shortlist, surface, seed, subject_id
        )
    return order, explored, propensity


def _select(
    candidates: _Candidates,
    rows: np.ndarray,
    utility: np.ndarray,
    calibrated: np.ndarray,
    shortlist: ShortlistRows,
    surface: SurfaceConfig,
    seed: int,
    subject_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`select_slates` over candidate `rows`; results in candidate row numbers."""
    size = len(candidates.item_ids)
    unknown = len(shortlist.categories)
    category_code = np.where(candidates.category_code >= 0, candidates.category_code, unknown)
    capped = np.append(shortlist.category_capped, False)[category_code]
    creator_code = np.where(
        candidates.creator_code >= 0,
        candidates.creator_code,
        len(shortlist.creators) + np.arange(size),  # unknown creators: one each
    )
    selection = select_slates(
        SlateCandidates(
            subject_id=np.full(len(rows), subject_id, dtype=np.int64),
            item_id=candidates.item_ids[rows],
            utility=utility[rows].astype(np.float64),
            calibrated=calibrated[rows].astype(np.float64),
            category_code=category_code[rows].astype(np.int64),
            category_capped=capped[rows],
            creator_code=creator_code[rows].astype(np.int64),
            is_sponsored=candidates.sponsored[rows],
            is_exploration_candidate=(candidates.exploration & ~candidates.overlay)[rows],
        ),
        _online_surface(surface),
        seed=seed,
    )
    order = rows[selection.rows]
    explored = np.zeros(size, dtype=bool)
    propensity = np.ones(size)
    explored[order] = selection.explored
    propensity[order] = selection.propensity
    return order, explored, propensity


_ONLINE_SURFACES: dict[str, SurfaceConfig] = {}


def _online_surface(surface: SurfaceConfig) -> SurfaceConfig:
    """The surface with the policy's kept depth at every candidate a request can hold (the
    shortlist and three overlay sources), so the overlay share can reach its best-placed
    overlays however low the policy ranks them."""
    depth = surface.candidate_pool.shortlist_size + 3 * surface.candidate_pool.overlay_candidates
    found = _ONLINE_SURFACES.get(surface.name)
    if found is None or found.slate_policy != surface.slate_policy or found.store_depth != depth:
        found = surface.model_copy(update={"store_depth": depth})
        _ONLINE_SURFACES[surface.name] = found
    return found


def _with_overlay_share(
    order: np.ndarray, overlay: np.ndarray, want: int, slots: int
) -> np.ndarray:
    """The first `want` rows of the policy's `order` with exactly `slots` overlay rows (the
    best placed ones) when that many were kept; the policy's order is kept, and since its
    caps are upper bounds, any subset of its rows keeps them too."""
    is_overlay = overlay[order]
    chosen_overlay = order[is_overlay][:slots]
    chosen_base = order[~is_overlay][: want - len(chosen_overlay)]
    keep = np.isin(order, np.concatenate((chosen_overlay, chosen_base)))
    return order[keep][:want]
