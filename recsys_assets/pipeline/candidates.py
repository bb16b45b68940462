"""Multi-source candidate generation, merged with provenance, per subject shard.

Sources (names from `config.settings.SOURCES`):

| source | what it proposes |
| --- | --- |
| two_tower | exact top-K inner product of the subject's and the items' tower embeddings |
| collaborative | top-K EASE scores of the subject's engagement history (models/collaborative.py) |
| item_to_item | co-engagement neighbours (cosine over users) of the subject's recent items |
| content | popular items of the subject's favourite categories, by affinity share |
| trending | the region's fastest-growing items over the recent window |
| editorial | items of editorial lists valid now in the region, in list order |
| new_item_exploration | items created recently, the subject's categories first |
| long_tail_quality | outside the head of popularity, best smoothed engagement rate |

Everything a subject must never see (hidden item/creator/category, ineligible in the
region, another tenant's case, and items already consumed unless the surface sets
`repeat_consumption`) is removed before ranking, and each subject keeps at most the
surface's candidate budget, preferring candidates with the best rank relative to their
source's quota.

Every pool row also carries the subject's history scores for the item, whichever source
proposed it (HISTORY_SCORES): the collaborative model's and the item neighbours' sums over
the subject's whole engagement history and over their latest items. They are ranker inputs:
the ranker is trained on pools built by this same code (models/bundle.py), so it learns how
much each source's evidence is worth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys_assets.config import SurfaceConfig
from recsys_assets.config.settings import SOURCES
from recsys_assets.models.collaborative import (
    SCORE_BLOCK_VALUES,
    CollaborativeModel,
    read_dense_blocks,
)
from recsys_assets.pipeline.features import HISTORY_SCORES
from recsys_assets.pipeline.runs import (
    order_within_groups,
    rank_within_runs,
    run_lengths,
    run_starts,
)
from recsys_assets.pipeline.text import constant
from recsys_assets.rules.eligibility import item_rejection_reasons
from recsys_assets.rules.engagement import engagement_events, interest_signal
from recsys_assets.rules.person import CONSUMED_EVENTS, consumed_pairs, hidden_pairs
from recsys_assets.rules.tombstones import person_tombstones, tombstoned_items

CANDIDATE_POLICY_VERSION = "candidates_v2"
NEW_ITEM_DAYS = 14
LONG_TAIL_HEAD_SHARE = 0.1
I2I_NEIGHBOURS = 50
I2I_RECENT_ITEMS = 30
"""Each user's latest distinct items that co-occur in the item_to_item similarity."""
I2I_ITEM_BLOCK = 4096
"""Items per block of the co-occurrence product (memory: the block's co-occurrences)."""
RANK_COLUMNS = [f"rank_{source}" for source in SOURCES]
SOURCE_CODES = {source: np.int8(code) for code, source in enumerate(SOURCES)}
"""Proposals carry their source as its index in SOURCES (cheaper than a text column)."""

TwoTowerRetriever = Callable[[np.ndarray, np.ndarray, int, pd.DataFrame], pd.DataFrame]
"""(subject_ids, candidate item_ids, k, excluded (subject_id, item_id) pairs) →
frame of subject_id, item_id, rank_two_tower, retrieval_score."""


@dataclass(frozen=True)
class CandidateContext:
    """Everything about the region's items and its users' history, built once per partition."""

    items: pd.DataFrame
    """Eligible items: item_id, category, creator_id, tenant_id, required_role, popularity,
    created_at; most popular first."""
    history: pd.DataFrame
    """Positive engagement before score_time: user_id, item_id, ts, weight."""
    engagement: pd.DataFrame
    """subject_id, item_id, ts (latest) of every engaged pair before score_time: the input of
    the collaborative model and of the history scores."""
    blocked: pd.DataFrame
    """(subject_id, item_id) pairs never to propose: consumed or hidden."""
    similarity: SimilarityGraph
    """Item → neighbour similarities: the top I2I_NEIGHBOURS co-engaged eligible items per
    item (`_item_neighbours`), as a sparse graph every shard shares."""
    trending: np.ndarray
    editorial: np.ndarray
    new_items: pd.DataFrame
    long_tail: np.ndarray
    tenant_items: bool
    """True for surfaces that recommend a tenant's own cases (enterprise queue)."""
    collaborative: CollaborativeModel | None = None
    recent_history_items: int = 5


def build_context(
    *,
    items: pd.DataFrame,
    interactions: pd.DataFrame,
    user_controls: pd.DataFrame,
    editorial: pd.DataFrame,
    region: str,
    surface: SurfaceConfig,
    score_time: pd.Timestamp,
    trending_window_days: int,
    trending_min_share: float = 0.05,
    recent_history_items: int = 5,
    collaborative: CollaborativeModel | None = None,
    tombstones: pd.DataFrame | None = None,
    events: pd.DataFrame | None = None,
) -> CandidateContext:
    """Region-level candidate ingredients, using only data from before `score_time`.

    `tombstones` (policy changes not yet in the raw tables) withdraw items for the region
    and items or creators for one person, exactly as serving applies them. Serving
    `events` (`rules.person.read_events`) add the hides and purchases reported since the
    snapshot, whenever they happened: a person's wish holds from the moment it is known.
    """
    interactions = interactions[interactions["ts"] <= score_time]
    tenant_items = "tenant_actor" in surface.eligibility.requires
    reasons = item_rejection_reasons(items, region=region, now=score_time)
    eligible = items[reasons.isna().to_numpy()]
    blocked = _blocked_pairs(
        interactions,
        user_controls,
        items,
        repeat_consumption=surface.repeat_consumption,
        events=events,
    )
    if tombstones is not None and not tombstones.empty:
        eligible = eligible[~tombstoned_items(tombstones, eligible, region=region, now=score_time)]
        blocked = pd.concat(
            [blocked, _person_tombstone_pairs(tombstones, items, score_time)], ignore_index=True
        ).drop_duplicates()
    owned = eligible["tenant_id"].notna()
    eligible = eligible[owned] if tenant_items else eligible[~owned]

    positives = interactions[interest_signal(interactions)]
    weights = positives["event_type"].map({"click": 1.0, "rating": 1.0, "purchase": 2.0})
    history = positives.assign(weight=weights.astype("float32"))[
        ["user_id", "item_id", "ts", "weight"]
    ]
    popularity = history.groupby("item_id")["weight"].sum()
    eligible = eligible.assign(
        popularity=eligible["item_id"].map(popularity).fillna(0.0).astype("float32")
    )[
        [
            "item_id",
            "category",
            "creator_id",
            "tenant_id",
            "required_role",
            "popularity",
            "created_at",
        ]
    ]
    eligible = eligible.sort_values(["popularity", "item_id"], ascending=[False, True])

    return CandidateContext(
        items=eligible.reset_index(drop=True),
        history=history,
        engagement=_engagement(interactions),
        blocked=blocked,
        similarity=SimilarityGraph.of(_item_neighbours(history, eligible["item_id"].to_numpy())),
        trending=_trending(
            history,
            eligible,
            score_time,
            trending_window(history, trending_window_days, trending_min_share, score_time),
        ),
        editorial=_editorial(editorial, eligible, region, score_time),
        new_items=eligible[eligible["created_at"] >= score_time - pd.Timedelta(days=NEW_ITEM_DAYS)]
        .sort_values(["created_at", "item_id"], ascending=[False, True])
        .reset_index(drop=True),
        long_tail=_long_tail(interactions, eligible),
        tenant_items=tenant_items,
        collaborative=collaborative,
        recent_history_items=recent_history_items,
    )


def _engagement(interactions: pd.DataFrame) -> pd.DataFrame:
    engaged = interactions.loc[engagement_events(interactions), ["user_id", "item_id", "ts"]]
    latest = engaged.groupby(["user_id", "item_id"], sort=False)["ts"].max().reset_index()
    return latest.rename(columns={"user_id": "subject_id"}).astype(
        {"subject_id": "int64", "item_id": "int64"}
    )


def trending_window(
    history: pd.DataFrame, min_days: int, min_share: float, score_time: pd.Timestamp
) -> pd.Timedelta:
    """The trending window: at least `min_days`, widened until it holds `min_share` of the
    events, so data whose last days are nearly empty still has something trending."""
    shortest = pd.Timedelta(days=min_days)
    if history.empty:
        return shortest
    ages = (score_time - pd.to_datetime(history["ts"])).to_numpy(dtype="timedelta64[ns]")
    needed = pd.Timedelta(np.quantile(ages, min(min_share, 1.0), method="higher"))
    return max(shortest, needed + pd.Timedelta(seconds=1))


def _person_tombstone_pairs(
    tombstones: pd.DataFrame, items: pd.DataFrame, score_time: pd.Timestamp
) -> pd.DataFrame:
    """(subject_id, item_id) pairs withdrawn from one person by a tombstone."""
    person = person_tombstones(tombstones, now=score_time)
    pairs = [(user, item) for user, withdrawn in person.items.items() for item in withdrawn]
    by_creator = items.groupby("creator_id", sort=False)["item_id"]
    for user, creators in person.creators.items():
        for creator in creators:
            if creator in by_creator.groups:
                pairs += [(user, item) for item in by_creator.get_group(creator)]
    return pd.DataFrame(pairs, columns=["subject_id", "item_id"], dtype="int64")


def _blocked_pairs(
    interactions: pd.DataFrame,
    user_controls: pd.DataFrame,
    items: pd.DataFrame,
    *,
    repeat_consumption: bool,
    events: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """(subject_id, item_id) pairs never to propose: hidden, and consumed unless repeats are
    allowed (the person rules of `rules.person`, as serving's final check applies them)."""
    blocked = [hidden_pairs(user_controls, items, events)]
    if not repeat_consumption:
        blocked.append(consumed_pairs(interactions, events))
    pairs = pd.concat(blocked, ignore_index=True).drop_duplicates()
    return pairs.rename(columns={"user_id": "subject_id"}).reset_index(drop=True)


def _item_neighbours(history: pd.DataFrame, eligible_ids: np.ndarray) -> pd.DataFrame:
    """Top I2I_NEIGHBOURS co-engaged eligible items per item, ordered by item_id, similarity
    descending, neighbour_id.

    Each user's I2I_RECENT_ITEMS most recent distinct items (latest engagement first, ties:
    lower item_id) co-occur pairwise; similarity = co-occurrences / sqrt(degree × degree),
    degree = users with the item among their recent ones. The co-occurrence counts are a
    sparse product (items × users) @ (users × items), a block of items at a time, so memory
    stays bounded by the block, not by items².
    """
    users, items = _recent_distinct(history, I2I_RECENT_ITEMS)
    item_ids, item_code = np.unique(items, return_inverse=True)
    user_code = np.unique(users, return_inverse=True)[1]
    engaged = sp.csr_matrix(
        (np.ones(len(item_code), dtype=np.int64), (user_code, item_code)),
        shape=(int(user_code.max(initial=-1)) + 1, len(item_ids)),
    )
    degree = np.bincount(item_code, minlength=len(item_ids)).astype(np.float64)
    eligible = np.isin(item_ids, np.asarray(eligible_ids, dtype=np.int64))
    by_item = engaged.T.tocsr()
    blocks = []
    for start in range(0, len(item_ids), I2I_ITEM_BLOCK):
        co = (by_item[start : start + I2I_ITEM_BLOCK] @ engaged).tocoo()
        row = co.row.astype(np.int64) + start
        column = co.col.astype(np.int64)
        keep = (row != column) & eligible[column]
        row, column, count = row[keep], column[keep], co.data[keep].astype(np.float64)
        similarity = (count / np.sqrt(degree[row] * degree[column])).astype(np.float32)
        order = np.lexsort((column, -similarity, row))
        top = rank_within_runs(row[order]) < I2I_NEIGHBOURS
        blocks.append((row[order][top], column[order][top], similarity[order][top]))
    if not blocks:
        return pd.DataFrame(
            {
                "item_id": pd.Series(dtype="int64"),
                "neighbour_id": pd.Series(dtype="int64"),
                "similarity": pd.Series(dtype="float32"),
            }
        )
    rows, columns, similarities = (np.concatenate(parts) for parts in zip(*blocks, strict=True))
    return pd.DataFrame(
        {"item_id": item_ids[rows], "neighbour_id": item_ids[columns], "similarity": similarities}
    )


def _recent_distinct(history: pd.DataFrame, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(user_id, item_id) of each user's `count` most recently engaged distinct items."""
    users = history["user_id"].to_numpy(dtype=np.int64)
    items = history["item_id"].to_numpy(dtype=np.int64)
    stamps = history["ts"].to_numpy(dtype="datetime64[ns]").view(np.int64)
    order = np.lexsort((items, -stamps, users))  # per user: latest first, ties lower item
    users, items = users[order], items[order]
    item_code, item_values = pd.factorize(items)
    pair = pd.factorize(users)[0].astype(np.int64) * max(len(item_values), 1) + item_code
    latest = np.sort(np.unique(pair, return_index=True)[1])  # each pair's latest engagement
    users, items = users[latest], items[latest]
    recent = rank_within_runs(users) < count
    return users[recent], items[recent]


def _trending(
    history: pd.DataFrame, eligible: pd.DataFrame, score_time: pd.Timestamp, window: pd.Timedelta
) -> np.ndarray:
    """Items ranked by recent-window engagement over (smoothed) previous-window engagement."""
    recent = history[history["ts"] > score_time - window]
    previous = history[
        (history["ts"] <= score_time - window) & (history["ts"] > score_time - 2 * window)
    ]
    now_counts = recent.groupby("item_id")["weight"].sum()
    before = previous.groupby("item_id")["weight"].sum()
    ids = eligible["item_id"]
    current = ids.map(now_counts).fillna(0.0).to_numpy()
    growth = current * (current + 1.0) / (ids.map(before).fillna(0.0).to_numpy() + 5.0)
    order = np.lexsort((ids.to_numpy(), -growth))
    return ids.to_numpy()[order][current[order] > 0]


def _editorial(
    editorial: pd.DataFrame, eligible: pd.DataFrame, region: str, score_time: pd.Timestamp
) -> np.ndarray:
    live = editorial[
        (editorial["region"] == region)
        & (editorial["valid_from"] <= score_time)
        & (editorial["valid_to"] > score_time)
        & editorial["item_id"].isin(eligible["item_id"])
    ]
    ordered = live.sort_values(["position", "list_name", "item_id"])
    return ordered["item_id"].drop_duplicates().to_numpy()


def _long_tail(interactions: pd.DataFrame, eligible: pd.DataFrame) -> np.ndarray:
    """Outside the popularity head, ranked by a Beta-smoothed engagement-per-view rate."""
    head = max(1, int(len(eligible) * LONG_TAIL_HEAD_SHARE))
    tail = eligible.iloc[head:]
    relevant = interactions[interactions["item_id"].isin(tail["item_id"])]
    views = relevant[relevant["event_type"] == "view"].groupby("item_id").size()
    # Consumption per view: clicked, bought or rated, whatever the rating.
    engaged = relevant[relevant["event_type"].isin(CONSUMED_EVENTS)].groupby("item_id").size()
    ids = tail["item_id"]
    rate = (ids.map(engaged).fillna(0) + 1.0) / (
        ids.map(views).fillna(0) + ids.map(engaged).fillna(0) + 10.0
    )
    order = np.lexsort((ids.to_numpy(), -rate.to_numpy()))
    return ids.to_numpy()[order]


def generate_candidates(
    subjects: pd.DataFrame,
    context: CandidateContext,
    surface: SurfaceConfig,
    *,
    two_tower: TwoTowerRetriever | None,
    recent_items_per_user: int,
) -> pd.DataFrame:
    """Candidate pool for one shard of subjects: one row per (subject, item), with provenance."""
    subject_ids = subjects["subject_id"].to_numpy(dtype="int64")
    quota = {source: surface.sources.get(source, 0) for source in SOURCES}
    eligible_items = context.items
    if context.tenant_items:
        # Cases belong to one tenant: each actor only sees their own tenant's items.
        # and only the cases their role may act on.
        tenant_pairs = subjects[["subject_id", "tenant_id", "actor_role"]].merge(
            eligible_items[["item_id", "tenant_id", "required_role"]], on="tenant_id"
        )
        allowed = tenant_pairs["required_role"].isna() | (
            tenant_pairs["required_role"] == tenant_pairs["actor_role"]
        )
        tenant_pairs = tenant_pairs.loc[allowed, ["subject_id", "item_id"]]
    else:
        tenant_pairs = None

    shard_blocked = context.blocked[context.blocked["subject_id"].isin(subject_ids)]
    frames: list[pd.DataFrame] = []
    if two_tower is not None and quota["two_tower"] > 0 and len(eligible_items):
        retrieved = two_tower(
            subject_ids,
            eligible_items["item_id"].to_numpy(dtype="int64"),
            min(quota["two_tower"], len(eligible_items)),
            shard_blocked,
        )
        frames.append(
            retrieved.rename(columns={"rank_two_tower": "rank"}).assign(
                source=SOURCE_CODES["two_tower"]
            )
        )
    shard_history = context.history[context.history["user_id"].isin(subject_ids)]
    shard_engagement = context.engagement[context.engagement["subject_id"].isin(subject_ids)]
    affinity = _category_affinity(shard_history, eligible_items)
    builders = {
        "collaborative": lambda n: _from_collaborative(
            context.collaborative, subject_ids, shard_engagement, eligible_items, shard_blocked, n
        ),
        "item_to_item": lambda n: _from_neighbours(
            shard_history, context.similarity, n, recent_items_per_user
        ),
        "content": lambda n: _from_categories(affinity, eligible_items, n),
        "trending": lambda n: _same_for_all(subject_ids, context.trending[:n]),
        "editorial": lambda n: _same_for_all(subject_ids, context.editorial[:n]),
        "new_item_exploration": lambda n: _new_items(subject_ids, affinity, context.new_items, n),
        "long_tail_quality": lambda n: _same_for_all(subject_ids, context.long_tail[:n]),
    }
    for source, build in builders.items():
        if quota[source] > 0:
            frames.append(build(quota[source]).assign(source=SOURCE_CODES[source]))

    proposed = (
        pd.concat([frame for frame in frames if len(frame)], ignore_index=True)
        if any(len(frame) for frame in frames)
        else _empty_proposals()
    )
    proposed = proposed[proposed["subject_id"].isin(subject_ids)]
    proposed = proposed[proposed["item_id"].isin(eligible_items["item_id"])]
    if tenant_pairs is not None:
        proposed = proposed.merge(tenant_pairs, on=["subject_id", "item_id"])
    proposed = _anti_join(proposed, shard_blocked)
    merged = _merge_sources(proposed, quota, surface.candidate_budget)
    scores = history_scores(
        merged[["subject_id", "item_id"]],
        shard_engagement,
        context.similarity,
        context.collaborative,
        recent_items=context.recent_history_items,
    )
    for column in HISTORY_SCORES:
        merged[column] = scores[column]
    return merged


def latest_items(engagement: pd.DataFrame, count: int) -> pd.DataFrame:
    """Each subject's `count` most recently engaged items (ties: higher item_id first)."""
    ordered = engagement.sort_values(
        ["subject_id", "ts", "item_id"], ascending=[True, False, False], kind="stable"
    )
    return ordered.groupby("subject_id", sort=False).head(count)


def history_scores(
    pairs: pd.DataFrame,
    engagement: pd.DataFrame,
    similarity: SimilarityGraph,
    collaborative: CollaborativeModel | None,
    *,
    recent_items: int,
) -> dict[str, np.ndarray]:
    """HISTORY_SCORES for each (subject_id, item_id) row of `pairs`, in row order.

    `*_recent_score` uses only the subject's `recent_items` latest items: what they are into
    now, which a sum over a long history blurs.
    """
    recent = latest_items(engagement, recent_items)
    pair_subjects = pairs["subject_id"].to_numpy(dtype=np.int64)
    subjects = np.unique(pair_subjects)
    rows = np.searchsorted(subjects, pair_subjects)
    found: dict[str, np.ndarray] = {}
    for suffix, history in (("score", engagement), ("recent_score", recent)):
        found[f"item_to_item_{suffix}"] = similarity.pair_sums(pairs, history)
        found[f"collaborative_{suffix}"] = (
            np.zeros(len(pairs), dtype=np.float32)
            if collaborative is None or collaborative.size == 0
            else collaborative.pair_scores(
                collaborative.history_matrix(subjects, history),
                rows,
                pairs["item_id"].to_numpy(dtype=np.int64),
            )
        )
    return found


@dataclass(frozen=True)
class SimilarityGraph:
    """Item → neighbour similarities as a sparse matrix over the graph's (sorted) item ids.

    A subject's item_to_item evidence for an item is Σ over their history items h of
    similarity(h → item): one sparse product (history × graph) for a whole shard.
    Similarities are float64 so a sum over a long history rounds once.
    """

    item_ids: np.ndarray
    matrix: sp.csr_matrix

    @classmethod
    def of(cls, neighbours: pd.DataFrame) -> SimilarityGraph:
        sources = neighbours["item_id"].to_numpy(dtype=np.int64)
        targets = neighbours["neighbour_id"].to_numpy(dtype=np.int64)
        item_ids = np.unique(np.concatenate((sources, targets)))
        matrix = sp.csr_matrix(
            (
                neighbours["similarity"].to_numpy(dtype=np.float64),
                (np.searchsorted(item_ids, sources), np.searchsorted(item_ids, targets)),
            ),
            shape=(len(item_ids), len(item_ids)),
        )
        return cls(item_ids, matrix)

    def visits(self, subjects: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """Sorted subject ids and their subjects × graph-items counts of the history rows
        (subjects[i], items[i]) whose item is in the graph."""
        item_at = _positions(self.item_ids, items)
        linked = item_at >= 0
        subject_ids, subject_row = np.unique(subjects[linked], return_inverse=True)
        return subject_ids, sp.csr_matrix(
            (np.ones(int(linked.sum())), (subject_row, item_at[linked])),
            shape=(len(subject_ids), len(self.item_ids)),
        )

    def totals(self, subjects: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """Sorted subject ids and their subjects × graph-items sums (indices sorted) over the
        history rows (subjects[i], items[i]); a row counts as often as it appears."""
        subject_ids, visits = self.visits(subjects, items)
        totals = (visits @ self.matrix).tocsr()
        totals.sort_indices()
        return subject_ids, totals

    def pair_sums(self, pairs: pd.DataFrame, history: pd.DataFrame) -> np.ndarray:
        """The sum for each (subject_id, item_id) row of `pairs` over `history` (subject_id,
        item_id rows), float32; 0 where the subject's history never links to the item.

        The subjects' sums are made dense a block of subjects at a time and read at the
        pairs (`read_dense_blocks`): no sorted sparse result to search per pair."""
        if pairs.empty or history.empty or len(self.item_ids) == 0:
            return np.zeros(len(pairs), dtype=np.float32)
        subject_ids, visits = self.visits(
            history["subject_id"].to_numpy(dtype=np.int64),
            history["item_id"].to_numpy(dtype=np.int64),
        )
        rows = _positions(subject_ids, pairs["subject_id"].to_numpy(dtype=np.int64))
        columns = _positions(self.item_ids, pairs["item_id"].to_numpy(dtype=np.int64))
        columns[rows < 0] = -1
        return read_dense_blocks(
            np.maximum(rows, 0),
            columns,
            len(subject_ids),
            len(self.item_ids),
            lambda start, stop: (visits[start:stop] @ self.matrix).toarray(),
        ).astype(np.float32)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each id in the sorted unique `sorted_ids`; -1 where absent."""
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == ids, at, -1).astype(np.int64)


def _from_collaborative(
    model: CollaborativeModel | None,
    subject_ids: np.ndarray,
    engagement: pd.DataFrame,
    eligible_items: pd.DataFrame,
    blocked: pd.DataFrame,
    n: int,
) -> pd.DataFrame:
    """Each subject's n best eligible, unblocked items by EASE score (subjects with history)."""
    if model is None or model.size == 0 or engagement.empty:
        return _empty_proposals().drop(columns="source")
    subjects = np.unique(subject_ids)
    allowed = np.zeros(model.size, dtype=bool)
    columns = model.columns(eligible_items["item_id"].to_numpy(dtype=np.int64))
    allowed[columns[columns >= 0]] = True
    depth = min(n, int(allowed.sum()))
    if depth <= 0:
        return _empty_proposals().drop(columns="source")
    matrix = model.history_matrix(subjects, engagement)
    never = model.history_matrix(subjects, blocked)  # the pairs never to propose
    has_history = np.diff(matrix.indptr) > 0
    frames = []
    batch = max(1, SCORE_BLOCK_VALUES // max(model.size, 1))
    for start in range(0, len(subjects), batch):
        stop = min(start + batch, len(subjects))
        scores = model.scores(matrix[start:stop])
        scores[:, ~allowed] = -np.inf
        scores[never[start:stop].nonzero()] = -np.inf
        top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        top_scores = np.take_along_axis(scores, top, axis=1)
        top_items = model.item_ids[top]
        # Each subject's picks by score, then lower item id (as _top_n ranks): a sort
        # within each row of `depth`, refused pairs (-inf) last.
        by_rank = np.lexsort((top_items, -top_scores))
        top_items = np.take_along_axis(top_items, by_rank, axis=1)
        top_scores = np.take_along_axis(top_scores, by_rank, axis=1)
        rows, ranks = np.nonzero(np.isfinite(top_scores) & has_history[start:stop, None])
        frames.append(
            pd.DataFrame(
                {
                    "subject_id": subjects[start + rows],
                    "item_id": top_items[rows, ranks],
                    "rank": ranks + 1,
                }
            )
        )
    if not frames:
        return _empty_proposals().drop(columns="source")
    return pd.concat(frames, ignore_index=True)


def provenance_labels(present: np.ndarray) -> pd.Categorical:
    """`|`-joined source names per row of a (rows × SOURCES) boolean matrix, as coded text
    (pipeline/text.py): the row's combination of sources is its code, so no string is built
    or hashed per row. The categories are every combination, used or not, so any block of
    subjects codes the same way (`in_subject_blocks`)."""
    packed = np.packbits(present, axis=1, bitorder="little")  # bit b = SOURCES[b]
    codes = np.zeros(len(present), dtype=np.int64)
    for byte in range(packed.shape[1]):
        codes |= packed[:, byte].astype(np.int64) << (8 * byte)
    labels = [
        "|".join(name for bit, name in enumerate(SOURCES) if code >> bit & 1)
        for code in range(1 << len(SOURCES))
    ]
    return pd.Categorical.from_codes(codes, categories=labels)


def _empty_proposals() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "subject_id": pd.Series(dtype="int64"),
            "item_id": pd.Series(dtype="int64"),
            "rank": pd.Series(dtype="int64"),
            "retrieval_score": pd.Series(dtype="float32"),
            "source": pd.Series(dtype="int8"),
        }
    )


def _category_affinity(history: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """subject_id, category, share: each subject's engagement share per category."""
    joined = history.merge(items[["item_id", "category"]], on="item_id", how="inner")
    weights = joined.groupby(["user_id", "category"], sort=False)["weight"].sum().rename("w")
    weights = weights.reset_index().rename(columns={"user_id": "subject_id"})
    weights["share"] = weights["w"] / weights.groupby("subject_id")["w"].transform("sum")
    return weights[["subject_id", "category", "share"]]


def _from_neighbours(
    history: pd.DataFrame, similarity: SimilarityGraph, n: int, recent_per_user: int
) -> pd.DataFrame:
    """Each subject's n items of highest summed similarity to their recent items."""
    recent = (
        history.sort_values(["user_id", "ts"], ascending=[True, False])
        .groupby("user_id", sort=False)
        .head(recent_per_user)
    )
    subject_ids, totals = similarity.totals(
        recent["user_id"].to_numpy(dtype=np.int64), recent["item_id"].to_numpy(dtype=np.int64)
    )
    entry_rows = np.repeat(np.arange(totals.shape[0]), np.diff(totals.indptr))
    return _top_n(
        pd.DataFrame(
            {
                "subject_id": subject_ids[entry_rows],
                "item_id": similarity.item_ids[totals.indices],
                "similarity": totals.data,
            }
        ),
        "similarity",
        n,
    )


def _from_categories(affinity: pd.DataFrame, items: pd.DataFrame, n: int) -> pd.DataFrame:
    """Each subject's n slots split over their categories by share, most popular items first."""
    if affinity.empty:
        return _empty_proposals().drop(columns="source")
    per_category = items.assign(category_rank=items.groupby("category", sort=False).cumcount() + 1)[
        ["item_id", "category", "category_rank", "popularity"]
    ]
    per_category = per_category[per_category["category_rank"] <= n]
    slots = affinity.assign(slots=np.ceil(affinity["share"] * n).astype("int64"))
    joined = slots.merge(per_category, on="category")
    joined = joined[joined["category_rank"] <= joined["slots"]]
    joined = joined.assign(score=joined["share"] / joined["category_rank"])
    return _top_n(joined[["subject_id", "item_id", "score"]], "score", n)


def _same_for_all(subject_ids: np.ndarray, ranked_items: np.ndarray) -> pd.DataFrame:
    n_items = len(ranked_items)
    return pd.DataFrame(
        {
            "subject_id": np.repeat(subject_ids, n_items),
            "item_id": np.tile(ranked_items.astype("int64"), len(subject_ids)),
            "rank": np.tile(np.arange(1, n_items + 1, dtype="int64"), len(subject_ids)),
        }
    )


def _new_items(
    subject_ids: np.ndarray, affinity: pd.DataFrame, new_items: pd.DataFrame, n: int
) -> pd.DataFrame:
    """Recent items, those in the subject's categories first, then newest first."""
    if new_items.empty:
        return _empty_proposals().drop(columns="source")
    pool = new_items.head(max(n * 5, n))[["item_id", "category"]].assign(
        recency=lambda frame: 1.0 / (np.arange(len(frame)) + 1.0)
    )
    grid = pd.DataFrame({"subject_id": subject_ids}).merge(pool, how="cross")
    grid = grid.merge(affinity, on=["subject_id", "category"], how="left")
    grid["score"] = grid["share"].fillna(0.0) + 0.01 * grid["recency"]
    return _top_n(grid[["subject_id", "item_id", "score"]], "score", n)


def _top_n(frame: pd.DataFrame, score: str, n: int) -> pd.DataFrame:
    """Each subject's n best rows by `score` (ties: lower item_id), ranked from 1."""
    subject = frame["subject_id"].to_numpy(dtype=np.int64)
    item = frame["item_id"].to_numpy(dtype=np.int64)
    order = order_within_groups(
        pd.factorize(subject, sort=True)[0], -frame[score].to_numpy(dtype=np.float64), item
    )
    ranked_subject = subject[order]
    rank = rank_within_runs(ranked_subject) + 1
    top = rank <= n
    return pd.DataFrame(
        {"subject_id": ranked_subject[top], "item_id": item[order][top], "rank": rank[top]}
    )


def _anti_join(frame: pd.DataFrame, blocked: pd.DataFrame) -> pd.DataFrame:
    if blocked.empty or frame.empty:
        return frame
    marked = frame.merge(blocked.assign(_blocked=True), on=["subject_id", "item_id"], how="left")
    return marked[marked["_blocked"].isna()].drop(columns="_blocked")


def _merge_sources(proposed: pd.DataFrame, quota: dict[str, int], budget: int) -> pd.DataFrame:
    """One row per (subject, item): provenance, per-source ranks, best relative rank, budget.

    A pair's relative rank is its best rank / its source's quota; each subject keeps its
    `budget` pairs of lowest relative rank (ties: lower item_id). The proposals are sorted
    once on an order-preserving integer code of (subject_id, item_id), so the pairs come out
    in that order and each pair's values are reductions over its run of rows. Only subjects
    with more than `budget` pairs (few: the budget is sized to hold the sources' quotas) are
    sorted by relative rank.
    """
    if proposed.empty:
        proposed = _empty_proposals()
    quotas = np.array([max(quota.get(name, 0), 1) for name in SOURCES], dtype=np.float64)
    subject_code, subject_values = pd.factorize(
        proposed["subject_id"].to_numpy(dtype=np.int64), sort=True
    )
    item_code, item_values = pd.factorize(proposed["item_id"].to_numpy(dtype=np.int64), sort=True)
    items = max(len(item_values), 1)
    code = subject_code.astype(np.int64) * items + item_code
    order = np.argsort(code, kind="stable")
    code = code[order]
    source = proposed["source"].to_numpy(dtype=np.int64)[order]
    rank = proposed["rank"].to_numpy(dtype=np.int64)[order]
    score = (
        proposed["retrieval_score"].to_numpy(dtype=np.float32, na_value=np.nan)[order]
        if "retrieval_score" in proposed.columns
        else np.full(len(proposed), np.nan, dtype=np.float32)
    )
    starts = run_starts(code)
    pairs = code[starts]
    pair_subject = pairs // items
    best_relative = (
        np.minimum.reduceat(rank / quotas[source], starts) if starts.size else np.zeros(0)
    )

    # Subjects over the budget keep their `budget` pairs of lowest relative rank; a stable
    # sort keeps pairs of equal relative rank in item order.
    subject_starts = run_starts(pair_subject)
    crowded = np.repeat(
        run_lengths(subject_starts, pairs.size) > budget,
        run_lengths(subject_starts, pairs.size),
    )
    keep = ~crowded
    if crowded.any():
        candidates = np.flatnonzero(crowded)
        preferred = candidates[np.lexsort((best_relative[candidates], pair_subject[candidates]))]
        keep[preferred[rank_within_runs(pair_subject[preferred]) < budget]] = True
    kept = np.flatnonzero(keep)

    # Per-source ranks of the kept pairs (a source proposing a pair twice: its best rank),
    # as (sources × pairs) so each rank column is contiguous.
    kept_at = np.full(pairs.size, -1, dtype=np.int64)
    kept_at[kept] = np.arange(kept.size)
    row_kept = kept_at[np.repeat(np.arange(pairs.size), run_lengths(starts, code.size))]
    mine = row_kept >= 0
    unranked = np.iinfo(np.int64).max
    ranks = np.full(len(SOURCES) * kept.size, unranked, dtype=np.int64)
    np.minimum.at(ranks, source[mine] * kept.size + row_kept[mine], rank[mine])
    ranks[ranks == unranked] = 0  # not proposed by that source
    ranks = ranks.reshape(len(SOURCES), kept.size)
    merged = pd.DataFrame(
        {
            "subject_id": subject_values[pair_subject[kept]],
            "item_id": item_values[pairs[kept] % items],
            "source_provenance": provenance_labels((ranks > 0).T),
            **{column: ranks[index].astype(np.int32) for index, column in enumerate(RANK_COLUMNS)},
            "retrieval_score": (
                np.fmax.reduceat(score, starts)[kept] if starts.size else score[:0]
            ),
        }
    )
    merged["candidate_policy_version"] = constant(CANDIDATE_POLICY_VERSION, len(merged))
    return merged
