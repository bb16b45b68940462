"""Synthetic source tables with structure a model can learn, deterministic per seed.

Users have a few favourite categories and an activity level; items have a category, a
creator and power-law popularity. Most interactions fall in a user's favourite categories
and click/purchase/rating outcomes are better there, so a two-tower model and a ranker
both have signal to find. The catalogue also carries every case the final checks must
catch: banned, pending, inactive and deleted items, out-of-stock products, region-limited
items, sponsored items with live and ended campaigns, brand-new items, user hides, tenant
cases with roles and states, editorial lists that are live, expired or not yet valid.

Generation is vectorized with numpy and streamed by user range, so `large` (1M users)
runs in bounded memory: every chunk is validated against the contracts and written as
its own Parquet part before the next is generated.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations

import numpy as np
import pandas as pd

from recsys_assets.config import Settings
from recsys_assets.contracts.raw import check_foreign_keys, validate_table
from recsys_assets.data.snapshot import RawSnapshotWriter, naive_utc
from recsys_assets.warehouse import Warehouse

log = logging.getLogger(__name__)

DAY_S = 86_400
NS_PER_S = 1_000_000_000
WINDOW_DAYS = 56
"""Interactions span the eight weeks before as_of."""

CATEGORY_NAMES = (
    "books", "electronics", "fashion", "home", "garden", "toys", "sports", "beauty",
    "grocery", "music", "movies", "games", "automotive", "health", "pets", "jewelry",
    "office", "outdoors", "baby", "crafts", "travel", "food", "tech_news", "finance",
    "science", "history", "comedy", "cooking", "fitness", "photography", "design", "art",
    "diy", "parenting", "education", "podcasts", "anime", "cars", "real_estate", "wellness",
)  # fmt: skip
CASE_CATEGORIES = ("billing", "shipping", "account", "compliance")
TENANTS = ("tenant_acme", "tenant_globex", "tenant_initech")
ACTOR_ROLES = ("agent", "supervisor", "admin")
ITEM_TYPES = ("product", "article", "video")
EVENT_TYPES = ("view", "click", "purchase", "rating", "hide")
# Outcome mix per event: interest (favourite category) vs. browsing; ~1 : 0.3 : 0.05 overall.
_EVENT_P_FAVOURITE = (0.70, 0.22, 0.045, 0.03, 0.005)
_EVENT_P_BROWSING = (0.80, 0.13, 0.02, 0.02, 0.03)
EDITORIAL_LISTS = (  # name, valid_from and valid_to in days relative to as_of
    ("editors_picks", -5, 9),
    ("weekend_deals", -1, 2),
    ("autumn_collection", -40, -3),
    ("coming_soon", 2, 16),
)
EDITORIAL_LIST_LENGTH = 15
_REGION_LOCALES = {
    "na": (("en-US", "es-US", "fr-CA"), ("America/New_York", "America/Chicago", "America/Los_Angeles", "America/Toronto")),
    "eu": (("en-GB", "de-DE", "fr-FR", "es-ES"), ("Europe/London", "Europe/Berlin", "Europe/Paris", "Europe/Madrid")),
    "apac": (("ja-JP", "en-AU", "en-IN", "ko-KR"), ("Asia/Tokyo", "Australia/Sydney", "Asia/Kolkata", "Asia/Seoul")),
    "latam": (("es-MX", "pt-BR", "es-AR"), ("America/Mexico_City", "America/Sao_Paulo", "America/Argentina/Buenos_Aires")),
}  # fmt: skip
_DEFAULT_LOCALE = (("en-US",), ("UTC",))


@dataclass(frozen=True)
class SeedScale:
    """Sizes of one scale; `user_chunk` bounds memory (users and their events per part)."""

    name: str
    users: int
    items: int
    categories: int
    events_per_user: float
    actors_per_tenant: int
    cases_per_tenant: int
    user_chunk: int = 50_000


SCALES = {
    "tiny": SeedScale("tiny", 500, 300, 20, 30.0, 8, 40),
    "small": SeedScale("small", 10_000, 3_000, 30, 30.0, 40, 60),
    "medium": SeedScale("medium", 100_000, 20_000, 40, 30.0, 200, 300),
    "large": SeedScale("large", 1_000_000, 100_000, 40, 30.0, 1_000, 1_000),
}


@dataclass(frozen=True)
class SeedReport:
    """What `seed_warehouse` wrote."""

    scale: str
    seed: int
    as_of: datetime
    snapshot_id: str
    row_counts: dict[str, int]
    parts: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0


def default_as_of() -> datetime:
    """Today's midnight, UTC (naive): the same day gives the same data."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _timestamps(seconds: np.ndarray) -> np.ndarray:
    return (seconds.astype(np.int64) * NS_PER_S).astype("datetime64[ns]")


def _cdf(weights: np.ndarray) -> np.ndarray:
    cumulative = np.cumsum(weights, dtype=np.float64)
    return cumulative / cumulative[-1]


def _draw(rng: np.random.Generator, cdf: np.ndarray, size: int) -> np.ndarray:
    """Indices drawn with the probabilities whose cumulative distribution is `cdf`."""
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(cdf) - 1)


def _pick(rng: np.random.Generator, probabilities: tuple[float, ...], size: int) -> np.ndarray:
    return _draw(rng, _cdf(np.asarray(probabilities)), size)


def _zipf_weights(count: int, exponent: float) -> np.ndarray:
    return 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent


@dataclass
class _Catalog:
    """Items plus the arrays interactions are drawn from."""

    frame: pd.DataFrame
    categories: tuple[str, ...]
    category_weights: np.ndarray
    consumer_ids: np.ndarray
    consumer_popularity_cdf: np.ndarray
    by_category_ids: np.ndarray
    by_category_key: np.ndarray
    category_has_items: np.ndarray
    created_s: np.ndarray
    creator_of: np.ndarray
    first_case_id: int
    cases_per_tenant: int


class _Seeder:
    """Holds the parameters of one seeding run; each table has its own random stream."""

    def __init__(self, scale: SeedScale, seed: int, as_of: datetime, settings: Settings) -> None:
        self.scale = scale
        self.seed = seed
        self.as_of = as_of
        self.as_of_s = int(pd.Timestamp(as_of).value // NS_PER_S)
        self.regions = tuple(settings.regions)
        self.tenant_region = tuple(
            self.regions[index % len(self.regions)] for index in range(len(TENANTS))
        )
        enterprise = [
            name
            for name, surface in settings.surfaces.items()
            if "tenant_actor" in surface.eligibility.requires
        ]
        self.consumer_surfaces = tuple(name for name in settings.surfaces if name not in enterprise)
        self.enterprise_surfaces = tuple(enterprise)
        self.n_actors = len(TENANTS) * scale.actors_per_tenant
        self.first_actor_id = scale.users - self.n_actors + 1

    def rng(self, stream: str, chunk: int = 0) -> np.random.Generator:
        key = [self.seed, self.as_of_s, zlib.crc32(self.scale.name.encode())]
        return np.random.default_rng([*key, zlib.crc32(stream.encode()), chunk])

    # -- items ---------------------------------------------------------------------------

    def items(self) -> _Catalog:
        rng = self.rng("items")
        scale = self.scale
        n_cases = len(TENANTS) * scale.cases_per_tenant
        count = scale.items - n_cases
        categories = CATEGORY_NAMES[: scale.categories]
        category_weights = _zipf_weights(len(categories), 0.8)
        category_cdf = _cdf(category_weights)

        # Creators mostly publish in one home category; a few creators are prolific.
        n_creators = max(10, count // 5)
        creator_home = _draw(rng, category_cdf, n_creators)
        creator = _draw(rng, _cdf(_zipf_weights(n_creators, 0.6)), count)
        category = np.where(
            rng.random(count) < 0.7, creator_home[creator], _draw(rng, category_cdf, count)
        )
        popularity = _zipf_weights(count, 1.0)[rng.permutation(count)]
        item_type = _pick(rng, (0.6, 0.25, 0.15), count)
        is_product = item_type == 0

        stock = np.where(rng.random(count) < 0.1, 0, rng.integers(1, 500, count))
        stock = np.where(is_product, stock, -1)
        sponsored = rng.random(count) < 0.05
        n_campaigns = max(3, int(sponsored.sum()) // 5)
        campaign_live = rng.random(n_campaigns) < 0.7
        campaign_end_s = self.as_of_s + np.where(
            campaign_live,
            rng.integers(1 * DAY_S, 30 * DAY_S, n_campaigns),
            -rng.integers(1 * DAY_S, 20 * DAY_S, n_campaigns),
        )
        campaign = rng.integers(0, n_campaigns, count)
        is_new = rng.random(count) < 0.04
        created_s = self.as_of_s - np.where(
            is_new, rng.integers(0, 4 * DAY_S, count), rng.integers(10 * DAY_S, 720 * DAY_S, count)
        )
        item_ids = np.arange(1, count + 1, dtype=np.int64)
        category_names = np.asarray(categories, dtype=object)[category]
        type_names = np.asarray(ITEM_TYPES, dtype=object)[item_type]
        consumer = pd.DataFrame(
            {
                "item_id": item_ids,
                "item_type": type_names,
                "title": pd.Series(category_names).str.replace("_", " ").str.title()
                + " "
                + type_names
                + " #"
                + item_ids.astype(str),
                "category": category_names,
                "creator_id": "creator_" + pd.Series(creator).astype(str).str.zfill(6),
                "regions": self._region_lists(rng, count),
                "status": np.asarray(("active", "inactive", "deleted"), dtype=object)[
                    _pick(rng, (0.95, 0.03, 0.02), count)
                ],
                "policy_state": np.asarray(("approved", "pending", "banned"), dtype=object)[
                    _pick(rng, (0.96, 0.02, 0.02), count)
                ],
                "stock": stock.astype(np.int64),
                "is_sponsored": sponsored,
                "campaign_id": pd.Series(
                    "cmp_" + pd.Series(campaign).astype(str).str.zfill(4), dtype=object
                ).where(sponsored, None),
                "campaign_end": pd.Series(_timestamps(campaign_end_s[campaign])).where(sponsored),
                "risk_level": np.asarray(("low", "medium", "high"), dtype=object)[
                    _pick(rng, (0.9, 0.08, 0.02), count)
                ],
                "tenant_id": None,
                "required_role": None,
                "case_state": None,
                "created_at": _timestamps(created_s),
            }
        )
        cases = self._cases(rng, first_id=count + 1)
        frame = pd.concat([consumer, cases], ignore_index=True)

        order = np.lexsort((rng.random(count), category))  # items grouped by category
        within = popularity[order]
        sorted_category = category[order]
        starts = np.searchsorted(sorted_category, np.arange(len(categories)))
        ends = np.searchsorted(sorted_category, np.arange(len(categories)), side="right")
        cumulative = np.cumsum(within)
        offset = np.concatenate([[0.0], cumulative])[starts]
        total = np.concatenate([[0.0], cumulative])[ends] - offset
        fraction = (cumulative - offset[sorted_category]) / np.where(total > 0, total, 1)[
            sorted_category
        ]
        return _Catalog(
            frame=frame,
            categories=categories,
            category_weights=category_weights,
            consumer_ids=item_ids,
            consumer_popularity_cdf=_cdf(popularity),
            by_category_ids=item_ids[order],
            by_category_key=sorted_category + fraction,
            category_has_items=ends > starts,
            created_s=frame["created_at"].to_numpy().astype("datetime64[s]").astype(np.int64),
            creator_of=frame["creator_id"].to_numpy(dtype=object),
            first_case_id=count + 1,
            cases_per_tenant=self.scale.cases_per_tenant,
        )

    def _region_lists(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """70% everywhere, 20% one region, 10% a pair (when several regions exist)."""
        singles = list(self.regions)
        pairs = ["|".join(pair) for pair in combinations(self.regions, 2)] or singles
        band = rng.random(count)
        return np.where(
            band < 0.7,
            "*",
            np.where(
                band < 0.9,
                np.asarray(singles, dtype=object)[rng.integers(0, len(singles), count)],
                np.asarray(pairs, dtype=object)[rng.integers(0, len(pairs), count)],
            ),
        ).astype(object)

    def _cases(self, rng: np.random.Generator, first_id: int) -> pd.DataFrame:
        """Enterprise cases: owned by a tenant, some needing a role, some already closed."""
        per = self.scale.cases_per_tenant
        count = per * len(TENANTS)
        tenant = np.repeat(np.arange(len(TENANTS)), per)
        roles = np.asarray(ACTOR_ROLES, dtype=object)[_pick(rng, (0.6, 0.3, 0.1), count)]
        item_ids = np.arange(first_id, first_id + count, dtype=np.int64)
        tenants = np.asarray(TENANTS, dtype=object)[tenant]
        return pd.DataFrame(
            {
                "item_id": item_ids,
                "item_type": "case",
                "title": "Case " + item_ids.astype(str),
                "category": np.asarray(CASE_CATEGORIES, dtype=object)[
                    rng.integers(0, len(CASE_CATEGORIES), count)
                ],
                "creator_id": tenants + "_team_" + rng.integers(1, 4, count).astype(str),
                "regions": np.asarray(self.tenant_region, dtype=object)[tenant],
                "status": np.where(rng.random(count) < 0.95, "active", "inactive").astype(object),
                "policy_state": "approved",
                "stock": np.full(count, -1, dtype=np.int64),
                "is_sponsored": np.zeros(count, dtype=bool),
                "campaign_id": None,
                "campaign_end": pd.Series(pd.NaT, index=range(count), dtype="datetime64[ns]"),
                "risk_level": np.where(rng.random(count) < 0.8, "low", "medium").astype(object),
                "tenant_id": tenants,
                "required_role": pd.Series(roles).where(rng.random(count) < 0.5, None),
                "case_state": np.asarray(("open", "in_progress", "closed"), dtype=object)[
                    _pick(rng, (0.6, 0.25, 0.15), count)
                ],
                "created_at": _timestamps(self.as_of_s - rng.integers(0, 30 * DAY_S, count)),
            }
        )

    def editorial(self, catalog: _Catalog) -> pd.DataFrame:
        """Per region: lists live now, expired and not yet valid; items weighted by popularity."""
        rng = self.rng("editorial")
        items = catalog.frame.iloc[: len(catalog.consumer_ids)]
        weights = np.sqrt(np.diff(np.concatenate([[0.0], catalog.consumer_popularity_cdf])))
        frames = []
        for region in self.regions:
            padded = "|" + items["regions"] + "|"
            available = padded.str.contains(f"|{region}|", regex=False) | (items["regions"] == "*")
            candidates = np.flatnonzero(available.to_numpy())
            for name, start_days, end_days in EDITORIAL_LISTS:
                length = min(EDITORIAL_LIST_LENGTH, len(candidates))
                chosen = rng.choice(
                    candidates,
                    size=length,
                    replace=False,
                    p=weights[candidates] / weights[candidates].sum(),
                )
                frames.append(
                    pd.DataFrame(
                        {
                            "list_name": name,
                            "region": region,
                            "item_id": catalog.consumer_ids[chosen],
                            "position": np.arange(1, length + 1, dtype=np.int64),
                            "valid_from": pd.Timestamp(self.as_of) + pd.Timedelta(days=start_days),
                            "valid_to": pd.Timestamp(self.as_of) + pd.Timedelta(days=end_days),
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True)

    # -- users and their behaviour, one chunk of user ids at a time ----------------------

    def users_chunk(
        self, chunk: int, start: int, stop: int, catalog: _Catalog
    ) -> dict[str, pd.DataFrame]:
        """Users with ids in [start, stop) plus their interactions, exposures and controls."""
        rng = self.rng("users", chunk)
        user_ids = np.arange(start, stop, dtype=np.int64)
        count = len(user_ids)
        is_actor = user_ids >= self.first_actor_id
        tenant = np.where(
            is_actor, (user_ids - self.first_actor_id) // max(1, self.scale.actors_per_tenant), -1
        )

        region_code = _draw(rng, _cdf(1.0 / np.arange(1, len(self.regions) + 1)), count)
        tenant_region_code = np.asarray([self.regions.index(r) for r in self.tenant_region])
        region_code = np.where(is_actor, tenant_region_code[np.maximum(tenant, 0)], region_code)
        locale = np.empty(count, dtype=object)
        timezone = np.empty(count, dtype=object)
        for code, region in enumerate(self.regions):
            locales, zones = _REGION_LOCALES.get(region, _DEFAULT_LOCALE)
            mask = region_code == code
            locale[mask] = np.asarray(locales, dtype=object)[
                rng.integers(0, len(locales), mask.sum())
            ]
            timezone[mask] = np.asarray(zones, dtype=object)[
                rng.integers(0, len(zones), mask.sum())
            ]

        # Recency: new, recently active, mid, lapsed (no events in the window), inactive > 90d.
        bucket = _pick(rng, (0.03, 0.62, 0.17, 0.08, 0.10), count)
        bucket = np.where(is_actor, np.minimum(bucket, 2).clip(1), bucket)
        low = np.asarray([0, 0, 7, 56, 91]) * DAY_S
        high = np.asarray([1, 7, 56, 90, 400]) * DAY_S
        idle_s = rng.integers(low[bucket], high[bucket])
        new_created = self.as_of_s - rng.integers(0, 3 * DAY_S, count)
        is_new = bucket == 0
        created_s = np.where(
            is_new, new_created, self.as_of_s - idle_s - rng.integers(DAY_S, 900 * DAY_S, count)
        )
        last_active_s = np.where(
            is_new,
            new_created + (rng.random(count) * (self.as_of_s - new_created)).astype(np.int64),
            self.as_of_s - idle_s,
        )
        window_start = np.maximum(self.as_of_s - WINDOW_DAYS * DAY_S, created_s)
        span = np.maximum(last_active_s - window_start, 0)
        activity = rng.lognormal(0.0, 0.8, count) / np.exp(0.8**2 / 2)
        bucket_factor = np.asarray([0.3, 1.3, 0.6, 0.0, 0.0])[bucket]
        events = rng.poisson(self.scale.events_per_user * activity * bucket_factor)
        events = np.where(span > 0, events, 0)
        favourites = _draw(rng, _cdf(catalog.category_weights), count * 3).reshape(count, 3)

        interactions = self._interactions(
            chunk, catalog, user_ids, events, last_active_s, span, favourites, is_actor, tenant
        )
        if len(interactions):
            latest = interactions.groupby("user_index")["ts_s"].max()
            last_active_s[latest.index.to_numpy()] = np.maximum(
                last_active_s[latest.index.to_numpy()], latest.to_numpy()
            )
        users = pd.DataFrame(
            {
                "user_id": user_ids,
                "region": np.asarray(self.regions, dtype=object)[region_code],
                "locale": locale,
                "tenant_id": pd.Series(
                    np.asarray(TENANTS, dtype=object)[np.maximum(tenant, 0)]
                ).where(is_actor, None),
                "actor_role": pd.Series(
                    np.asarray(ACTOR_ROLES, dtype=object)[_pick(rng, (0.7, 0.2, 0.1), count)]
                ).where(is_actor, None),
                "consent_personalization": rng.random(count) < 0.85,
                "email_subscribed": rng.random(count) < 0.60,
                "push_enabled": rng.random(count) < 0.40,
                "timezone": timezone,
                "quiet_hours_start": rng.integers(21, 24, count),
                "quiet_hours_end": rng.integers(6, 9, count),
                "created_at": _timestamps(created_s),
                "last_active_at": _timestamps(last_active_s),
            }
        )
        return {
            "users": users,
            "interactions": interactions.drop(columns=["user_index", "ts_s"]),
            "exposures": self._exposures(chunk, catalog, user_ids, created_s, is_actor, tenant),
            "user_controls": self._user_controls(
                chunk, catalog, user_ids, created_s, last_active_s, favourites, is_actor
            ),
        }

    def _interactions(
        self,
        chunk: int,
        catalog: _Catalog,
        user_ids: np.ndarray,
        events: np.ndarray,
        last_active_s: np.ndarray,
        span: np.ndarray,
        favourites: np.ndarray,
        is_actor: np.ndarray,
        tenant: np.ndarray,
    ) -> pd.DataFrame:
        rng = self.rng("interactions", chunk)
        owner = np.repeat(np.arange(len(user_ids)), events)
        total = len(owner)
        # Recent activity dominates: offsets from last activity are skewed towards zero.
        ts_s = last_active_s[owner] - (rng.random(total) ** 2 * span[owner]).astype(np.int64)

        favourite_category = favourites[owner, rng.integers(0, 3, total)]
        from_favourite = (rng.random(total) < 0.8) & catalog.category_has_items[favourite_category]
        by_category = np.searchsorted(
            catalog.by_category_key, favourite_category + rng.random(total), side="right"
        )
        by_category = np.minimum(by_category, len(catalog.by_category_ids) - 1)
        item_id = np.where(
            from_favourite,
            catalog.by_category_ids[by_category],
            catalog.consumer_ids[_draw(rng, catalog.consumer_popularity_cdf, total)],
        )
        actor_event = is_actor[owner]
        case_id = (
            catalog.first_case_id
            + tenant[owner] * catalog.cases_per_tenant
            + rng.integers(0, max(1, catalog.cases_per_tenant), total)
        )
        item_id = np.where(actor_event, case_id, item_id)
        # An item cannot be used before it exists: move such events after its creation.
        created = catalog.created_s[item_id - 1]
        late = ts_s < created
        ts_s = np.where(
            late, created + (rng.random(total) * (self.as_of_s - created)).astype(np.int64), ts_s
        )

        event_code = np.where(
            from_favourite | actor_event,
            _pick(rng, _EVENT_P_FAVOURITE, total),
            _pick(rng, _EVENT_P_BROWSING, total),
        )
        event_code = np.where(actor_event, np.minimum(event_code, 1), event_code)
        rating = np.clip(np.rint(rng.normal(np.where(from_favourite, 4.2, 2.7), 0.8)), 1, 5)
        value = np.where(event_code == EVENT_TYPES.index("rating"), rating, 1.0)
        order = np.lexsort((ts_s, owner))
        return pd.DataFrame(
            {
                "user_id": user_ids[owner][order],
                "item_id": item_id[order].astype(np.int64),
                "event_type": np.asarray(EVENT_TYPES, dtype=object)[event_code[order]],
                "value": value[order].astype(np.float64),
                "ts": _timestamps(ts_s[order]),
                "user_index": owner[order],
                "ts_s": ts_s[order],
            }
        )

    def _exposures(
        self,
        chunk: int,
        catalog: _Catalog,
        user_ids: np.ndarray,
        created_s: np.ndarray,
        is_actor: np.ndarray,
        tenant: np.ndarray,
    ) -> pd.DataFrame:
        """The last week's impressions per surface (what frequency caps count)."""
        rng = self.rng("exposures", chunk)
        counts = rng.poisson(np.where(is_actor, 3.0, 6.0))
        if not self.enterprise_surfaces:
            counts = np.where(is_actor, 0, counts)
        if not self.consumer_surfaces:
            counts = np.where(is_actor, counts, 0)
        owner = np.repeat(np.arange(len(user_ids)), counts)
        total = len(owner)
        actor = is_actor[owner]
        consumer_surface = np.asarray(self.consumer_surfaces or ("",), dtype=object)
        enterprise_surface = np.asarray(self.enterprise_surfaces or ("",), dtype=object)
        surface = np.where(
            actor,
            enterprise_surface[rng.integers(0, len(enterprise_surface), total)],
            consumer_surface[rng.integers(0, len(consumer_surface), total)],
        )
        item_id = np.where(
            actor,
            catalog.first_case_id
            + tenant[owner] * catalog.cases_per_tenant
            + rng.integers(0, max(1, catalog.cases_per_tenant), total),
            catalog.consumer_ids[_draw(rng, catalog.consumer_popularity_cdf, total)],
        )
        earliest = np.maximum(created_s[owner], catalog.created_s[item_id - 1])
        ts_s = np.maximum(self.as_of_s - rng.integers(0, 7 * DAY_S, total), earliest)
        order = np.lexsort((ts_s, owner))
        return pd.DataFrame(
            {
                "user_id": user_ids[owner][order],
                "item_id": item_id[order].astype(np.int64),
                "surface": surface[order].astype(object),
                "ts": _timestamps(ts_s[order]),
            }
        )

    def _user_controls(
        self,
        chunk: int,
        catalog: _Catalog,
        user_ids: np.ndarray,
        created_s: np.ndarray,
        last_active_s: np.ndarray,
        favourites: np.ndarray,
        is_actor: np.ndarray,
    ) -> pd.DataFrame:
        """About 4% of consumers hide an item, a creator or a category; a fifth undo it."""
        rng = self.rng("user_controls", chunk)
        hiding = np.flatnonzero((rng.random(len(user_ids)) < 0.04) & ~is_actor)
        total = len(hiding)
        target_code = _pick(rng, (0.6, 0.25, 0.15), total)
        item_index = _draw(rng, catalog.consumer_popularity_cdf, total)
        # A hidden category is never the user's top favourite.
        n_categories = len(catalog.categories)
        category_code = (favourites[hiding, 0] + rng.integers(1, max(2, n_categories), total)) % (
            n_categories
        )
        target_id = np.select(
            [target_code == 0, target_code == 1],
            [
                catalog.consumer_ids[item_index].astype(str).astype(object),
                catalog.creator_of[item_index],
            ],
            np.asarray(catalog.categories, dtype=object)[category_code],
        ).astype(object)
        earliest = np.maximum(created_s[hiding], catalog.created_s[item_index])
        latest = np.maximum(last_active_s[hiding], earliest)
        hide_s = latest - (rng.random(total) * np.minimum(latest - earliest, 14 * DAY_S)).astype(
            np.int64
        )
        undo = rng.random(total) < 0.2
        unhide_s = hide_s + (rng.random(total) * (self.as_of_s - hide_s)).astype(np.int64)
        target_type = np.asarray(("item", "creator", "category"), dtype=object)[target_code]
        return pd.DataFrame(
            {
                "user_id": np.concatenate([user_ids[hiding], user_ids[hiding][undo]]),
                "target_type": np.concatenate([target_type, target_type[undo]]),
                "target_id": np.concatenate([target_id, target_id[undo]]),
                "action": np.asarray(["hide"] * total + ["unhide"] * int(undo.sum()), dtype=object),
                "ts": _timestamps(np.concatenate([hide_s, unhide_s[undo]])),
            }
        ).sort_values(["user_id", "ts"], kind="stable", ignore_index=True)


def seed_warehouse(
    warehouse: Warehouse,
    *,
    scale: str | SeedScale,
    seed: int,
    settings: Settings,
    as_of: datetime | None = None,
) -> SeedReport:
    """Generate, validate and write every source table, then `raw/_snapshot.json`.

    The same (scale, seed, as_of) gives the same tables. Every chunk is validated against
    the contracts (types, values, foreign keys) before it is written.
    """
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
        scale = SCALES[scale]
    started = time.perf_counter()
    moment = naive_utc(as_of) if as_of is not None else default_as_of()
    seeder = _Seeder(scale, seed, moment, settings)
    regions = seeder.regions

    catalog = seeder.items()
    items = validate_table("items", catalog.frame, source="seed", now=moment, regions=regions)
    editorial = validate_table(
        "editorial", seeder.editorial(catalog), source="seed", now=moment, regions=regions
    )
    check_foreign_keys({"items": items, "editorial": editorial}, sources={})

    writer = RawSnapshotWriter(warehouse)
    writer.begin()
    writer.write_part("items", items)
    writer.write_part("editorial", editorial)
    size = scale.users
    step = scale.user_chunk
    for chunk, start in enumerate(range(1, size + 1, step)):
        stop = min(start + step, size + 1)
        tables = seeder.users_chunk(chunk, start, stop, catalog)
        validated = {
            table: validate_table(table, frame, source="seed", now=moment, regions=regions)
            for table, frame in tables.items()
        }
        check_foreign_keys({**validated, "items": items}, sources={})
        for table, frame in validated.items():
            writer.write_part(table, frame)
        log.info("seeded users %d..%d of %d", start, stop - 1, size)
    snapshot = writer.finish(
        {"source": "seed", "scale": scale.name, "seed": seed, "as_of": moment.isoformat()}
    )
    return SeedReport(
        scale=scale.name,
        seed=seed,
        as_of=moment,
        snapshot_id=snapshot["snapshot_id"],
        row_counts=dict(writer.row_counts),
        parts={table: len(parts) for table, parts in writer.parts.items()},
        elapsed_s=time.perf_counter() - started,
    )
