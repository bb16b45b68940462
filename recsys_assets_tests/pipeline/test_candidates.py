"""Candidate generation on small hand-made tables with known answers."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_assets.config import SurfaceConfig, load_settings
from recsys_assets.config.settings import SOURCES
from recsys_assets.models.collaborative import fit_collaborative
from recsys_assets.pipeline.candidates import (
    CANDIDATE_POLICY_VERSION,
    I2I_NEIGHBOURS,
    I2I_RECENT_ITEMS,
    RANK_COLUMNS,
    CandidateContext,
    SimilarityGraph,
    _item_neighbours,
    _merge_sources,
    _top_n,
    build_context,
    generate_candidates,
    provenance_labels,
    trending_window,
)
from recsys_assets.pipeline.features import HISTORY_SCORES
from recsys_assets.pipeline.text import plain_text_columns

NOW = pd.Timestamp("2026-11-20 00:00:00")


def _items() -> pd.DataFrame:
    n = 12
    frame = pd.DataFrame(
        {
            "item_id": np.arange(n, dtype="int64"),
            "item_type": "product",
            "title": None,
            "category": ["a", "a", "a", "b", "b", "b", "c", "c", "c", "a", "b", "c"],
            "creator_id": [f"cr{i % 4}" for i in range(n)],
            "regions": "*",
            "status": "active",
            "policy_state": "approved",
            "stock": 5,
            "is_sponsored": False,
            "campaign_id": None,
            "campaign_end": pd.NaT,
            "risk_level": "low",
            "tenant_id": None,
            "required_role": None,
            "case_state": None,
            "created_at": NOW - pd.Timedelta(days=60),
        }
    )
    frame.loc[9, "policy_state"] = "banned"
    frame.loc[10, "regions"] = "eu"
    frame.loc[11, "created_at"] = NOW - pd.Timedelta(days=1)  # a new item
    return frame


def _interactions() -> pd.DataFrame:
    rows = [
        # user 1 likes category a; user 2 likes a and b; user 3 likes c
        (1, 0, "click", 1.0, 10),
        (1, 1, "click", 1.0, 9),
        (1, 3, "view", 1.0, 8),
        (2, 0, "purchase", 1.0, 7),
        (2, 2, "click", 1.0, 6),
        (2, 4, "click", 1.0, 5),
        (3, 6, "click", 1.0, 4),
        (3, 7, "rating", 5.0, 3),
        (3, 8, "rating", 1.0, 2),
        (4, 1, "click", 1.0, 1),
        (4, 2, "click", 1.0, 1),
        (1, 5, "click", 1.0, -5),  # after score_time: must be ignored
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "days_ago"])
    frame["ts"] = NOW - pd.to_timedelta(frame.pop("days_ago"), unit="D")
    return frame


def _controls() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [2, 3, 3],
            "target_type": ["category", "item", "item"],
            "target_id": ["c", "4", "4"],
            "action": ["hide", "hide", "unhide"],
            "ts": [
                NOW - pd.Timedelta(days=1),
                NOW - pd.Timedelta(days=3),
                NOW - pd.Timedelta(days=2),
            ],
        }
    )


def _editorial() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "list_name": ["staff_picks", "staff_picks", "expired"],
            "region": ["na", "na", "na"],
            "item_id": [8, 9, 5],
            "position": [1, 2, 1],
            "valid_from": [NOW - pd.Timedelta(days=2)] * 3,
            "valid_to": [NOW + pd.Timedelta(days=2)] * 2 + [NOW - pd.Timedelta(days=1)],
        }
    )


@pytest.fixture
def pool() -> pd.DataFrame:
    surface = load_settings().surface("home_feed")
    context = _context(surface, collaborative=False)
    subjects = _subjects()
    return generate_candidates(subjects, context, surface, two_tower=None, recent_items_per_user=5)


def test_ineligible_consumed_and_hidden_items_never_proposed(pool: pd.DataFrame) -> None:
    by_subject = pool.groupby("subject_id")["item_id"].apply(set)
    everyone = set(pool["item_id"])
    assert 9 not in everyone, "banned item proposed"
    assert 10 not in everyone, "item not available in region proposed"
    assert not by_subject[1] & {0, 1}, "consumed items proposed to user 1"
    assert not by_subject[2] & {6, 7, 8, 11}, "hidden category c proposed to user 2"
    assert 4 in by_subject[3], "a later unhide must lift the earlier hide"


def test_provenance_and_ranks_are_merged(pool: pd.DataFrame) -> None:
    assert not pool.duplicated(["subject_id", "item_id"]).any()
    for _, row in pool.iterrows():
        named = set(row["source_provenance"].split("|"))
        ranked = {column.removeprefix("rank_") for column in RANK_COLUMNS if row[column] > 0}
        assert named == ranked
    editorial = pool[pool["rank_editorial"] > 0]
    assert set(editorial["item_id"]) == {8}, "only the live, eligible editorial item"
    new_items = pool[pool["rank_new_item_exploration"] > 0]
    assert set(new_items["item_id"]) <= {11}
    # user 1 engaged with items 0 and 1 (category a) → content proposes item 2 (a)
    content = pool[(pool["subject_id"] == 1) & (pool["rank_content"] > 0)]
    assert 2 in set(content["item_id"])


def test_item_to_item_uses_co_engagement(pool: pd.DataFrame) -> None:
    # users 2 and 4 co-engaged items 0/2 and 1/2: user 1 (items 0, 1) gets item 2 from i2i
    i2i = pool[(pool["subject_id"] == 1) & (pool["rank_item_to_item"] > 0)]
    assert 2 in set(i2i["item_id"])


def test_budget_is_enforced() -> None:
    surface = load_settings().surface("push").model_copy(update={"candidate_budget": 3})
    context = _context(surface, collaborative=False)
    subjects = _subjects()
    pool = generate_candidates(subjects, context, surface, two_tower=None, recent_items_per_user=5)
    assert pool.groupby("subject_id").size().max() <= 3


def test_provenance_labels_cover_every_combination() -> None:
    present = np.zeros((2, len(SOURCES)), dtype=bool)
    present[0, [SOURCES.index("two_tower"), SOURCES.index("content")]] = True
    assert provenance_labels(present).tolist() == ["two_tower|content", ""]


def _merge_reference(
    rows: list[tuple[int, int, int, int, float]], quota: dict[str, int], budget: int
) -> pd.DataFrame:
    """_merge_sources spelled out per pair, in plain Python."""
    pairs: dict[tuple[int, int], dict] = {}
    for subject, item, source, rank, score in rows:
        pair = pairs.setdefault(
            (subject, item), {"ranks": [0] * len(SOURCES), "relative": math.inf, "score": None}
        )
        previous = pair["ranks"][source]
        pair["ranks"][source] = rank if previous == 0 else min(previous, rank)
        pair["relative"] = min(pair["relative"], rank / max(quota[SOURCES[source]], 1))
        if not math.isnan(score):
            pair["score"] = score if pair["score"] is None else max(pair["score"], score)
    kept = []
    for subject in sorted({subject for subject, _ in pairs}):
        mine = sorted(
            (key for key in pairs if key[0] == subject),
            key=lambda key: (pairs[key]["relative"], key[1]),
        )
        kept += mine[:budget]
    kept.sort()
    return pd.DataFrame(
        {
            "subject_id": [subject for subject, _ in kept],
            "item_id": [item for _, item in kept],
            "source_provenance": [
                "|".join(SOURCES[index] for index, rank in enumerate(pairs[key]["ranks"]) if rank)
                for key in kept
            ],
            **{
                column: [pairs[key]["ranks"][index] for key in kept]
                for index, column in enumerate(RANK_COLUMNS)
            },
            "retrieval_score": [
                np.nan if pairs[key]["score"] is None else pairs[key]["score"] for key in kept
            ],
        }
    )


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 4),
            st.integers(0, 12),
            st.integers(0, len(SOURCES) - 1),
            st.integers(1, 9),
            st.one_of(st.just(math.nan), st.floats(-2, 2, width=32)),
        ),
        max_size=80,
    ),
    quotas=st.lists(st.integers(0, 6), min_size=len(SOURCES), max_size=len(SOURCES)),
    budget=st.integers(1, 8),
)
def test_merge_sources_matches_a_per_pair_reference(
    rows: list[tuple[int, int, int, int, float]], quotas: list[int], budget: int
) -> None:
    quota = dict(zip(SOURCES, quotas, strict=True))
    proposed = pd.DataFrame(
        rows, columns=["subject_id", "item_id", "source", "rank", "retrieval_score"]
    ).astype({"subject_id": "int64", "item_id": "int64", "source": "int8", "rank": "int64"})
    merged = _merge_sources(proposed.astype({"retrieval_score": "float32"}), quota, budget)
    expected = _merge_reference(rows, quota, budget)
    assert (merged["candidate_policy_version"] == CANDIDATE_POLICY_VERSION).all()
    assert merged[RANK_COLUMNS].dtypes.eq("int32").all()
    assert merged["retrieval_score"].dtype == np.float32
    assert isinstance(merged["source_provenance"].dtype, pd.CategoricalDtype)  # coded text
    pd.testing.assert_frame_equal(
        plain_text_columns(merged.drop(columns="candidate_policy_version")),
        expected,
        check_dtype=False,
        rtol=1e-6,
    )


def test_top_n_ranks_by_score_then_item_per_subject() -> None:
    frame = pd.DataFrame(
        {
            "subject_id": [2, 1, 1, 1, 2, 1],
            "item_id": [5, 9, 3, 7, 4, 1],
            "score": [0.1, 0.5, 0.9, 0.5, 0.1, 0.2],
        }
    )
    top = _top_n(frame, "score", 3)
    assert top.to_dict("list") == {
        "subject_id": [1, 1, 1, 2, 2],
        "item_id": [3, 7, 9, 4, 5],  # the 0.5 tie goes to the lower item_id
        "rank": [1, 2, 3, 1, 2],
    }
    assert _top_n(frame.iloc[:0], "score", 3).empty


def _context(
    surface: SurfaceConfig, *, collaborative: bool = True, **options: object
) -> CandidateContext:
    interactions = _interactions()
    return build_context(
        items=_items(),
        interactions=interactions,
        user_controls=_controls(),
        editorial=_editorial(),
        region="na",
        surface=surface,
        score_time=NOW,
        trending_window_days=3,
        collaborative=(
            fit_collaborative(interactions[interactions["ts"] <= NOW], l2=1.0)
            if collaborative
            else None
        ),
        **options,
    )


def _subjects() -> pd.DataFrame:
    return pd.DataFrame(
        {"subject_id": [1, 2, 3], "tenant_id": [None] * 3, "actor_role": [None] * 3}
    )


def test_collaborative_source_and_history_scores_on_every_row() -> None:
    surface = load_settings().surface("home_feed")
    context = _context(surface, recent_history_items=1)
    pool = generate_candidates(
        _subjects(), context, surface, two_tower=None, recent_items_per_user=5
    )
    assert (pool["rank_collaborative"] > 0).any()
    model = context.collaborative
    assert model is not None
    weights = pd.DataFrame(model.weights, index=model.item_ids, columns=model.item_ids)
    row = pool[(pool["subject_id"] == 1) & (pool["item_id"] == 2)].iloc[0]
    # user 1 engaged with items 0, 1 (clicks) and, latest, 3 (a view): the full score sums
    # all three rows of B, the recent one (1 latest item) only item 3's.
    assert row["collaborative_score"] == pytest.approx(weights.loc[[0, 1, 3], 2].sum(), rel=1e-5)
    assert row["collaborative_recent_score"] == pytest.approx(weights.loc[3, 2], rel=1e-5)
    assert row["item_to_item_score"] >= row["item_to_item_recent_score"] >= 0
    assert np.isfinite(pool[list(HISTORY_SCORES)].to_numpy()).all()


@pytest.mark.parametrize("repeat", [False, True])
def test_repeat_consumption_is_a_surface_setting(repeat: bool) -> None:
    surface = load_settings().surface("home_feed").model_copy(update={"repeat_consumption": repeat})
    pool = generate_candidates(
        _subjects(), _context(surface), surface, two_tower=None, recent_items_per_user=5
    )
    by_subject = pool.groupby("subject_id")["item_id"].apply(set)
    consumed_again = by_subject[1] & {0, 1}
    assert bool(consumed_again) is repeat
    # Hides hold either way: user 2 hid category c.
    assert not by_subject[2] & {6, 7, 8, 11}


def test_sparse_subjects_get_pools_of_store_depth() -> None:
    """One event per subject: the pool still fills to the budget from the catalog."""
    rng = np.random.default_rng(0)
    n_items, n_users = 400, 300
    items = pd.concat([_items().iloc[:1]] * n_items, ignore_index=True).assign(
        item_id=np.arange(n_items, dtype="int64"),
        category=[f"k{i % 7}" for i in range(n_items)],
        creator_id=[f"c{i}" for i in range(n_items)],
    )
    interactions = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype="int64"),
            "item_id": rng.zipf(1.5, n_users) % n_items,
            "event_type": "purchase",
            "value": 1.0,
            "ts": NOW - pd.Timedelta(days=400),  # long ago: every fixed window is empty
        }
    )
    surface = load_settings().surface("home_feed")
    context = build_context(
        items=items,
        interactions=interactions,
        user_controls=_controls().head(0),
        editorial=_editorial().head(0),
        region="na",
        surface=surface,
        score_time=NOW,
        trending_window_days=3,
        collaborative=fit_collaborative(interactions, l2=1.0),
    )
    assert len(context.trending) > 0, "the trending window widens to hold recent events"
    subjects = pd.DataFrame(
        {"subject_id": np.arange(n_users), "tenant_id": None, "actor_role": None}
    )
    pool = generate_candidates(subjects, context, surface, two_tower=None, recent_items_per_user=5)
    sizes = pool.groupby("subject_id").size().reindex(subjects["subject_id"], fill_value=0)
    assert (sizes >= surface.store_depth).all(), sizes.describe()


def test_trending_window_widens_to_hold_a_share_of_events() -> None:
    history = pd.DataFrame({"ts": NOW - pd.to_timedelta(np.arange(100) * 10, unit="D")})
    assert trending_window(history, 3, 0.05, NOW) > pd.Timedelta(days=40)
    recent = pd.DataFrame({"ts": [NOW - pd.Timedelta(hours=1)] * 100})
    assert trending_window(recent, 3, 0.05, NOW) == pd.Timedelta(days=3)


def _neighbours_reference(history: pd.DataFrame, eligible: set[int]) -> list[tuple[int, int]]:
    """_item_neighbours spelled out in plain Python: (item, neighbour) in output order."""
    latest: dict[tuple[int, int], pd.Timestamp] = {}
    for user, item, ts in history[["user_id", "item_id", "ts"]].itertuples(index=False):
        latest[(user, item)] = max(ts, latest.get((user, item), ts))
    recent: dict[int, list[int]] = {}
    for (user, item), _ts in sorted(
        latest.items(), key=lambda kv: (kv[0][0], -kv[1].value, kv[0][1])
    ):
        if len(recent.setdefault(user, [])) < I2I_RECENT_ITEMS:
            recent[user].append(item)
    degree: dict[int, int] = {}
    co: dict[tuple[int, int], int] = {}
    for items in recent.values():
        for a in items:
            degree[a] = degree.get(a, 0) + 1
            for b in items:
                if a != b and b in eligible:
                    co[(a, b)] = co.get((a, b), 0) + 1
    rows = []
    for item in sorted({a for a, _ in co}):
        scored = [
            (np.float32(count / math.sqrt(float(degree[a]) * degree[b])), b)
            for (a, b), count in co.items()
            if a == item
        ]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        rows += [(item, b) for _, b in scored[:I2I_NEIGHBOURS]]
    return rows


@settings(max_examples=25, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 70), st.integers(0, 40)),
        min_size=1,
        max_size=300,
    ),
    eligible_share=st.integers(1, 3),
)
def test_item_neighbours_match_a_plain_reference(
    events: list[tuple[int, int, int]], eligible_share: int
) -> None:
    """Recent distinct items per user (latest first), co-occurrence cosine, top neighbours."""
    history = pd.DataFrame(events, columns=["user_id", "item_id", "ts"]).assign(
        ts=lambda frame: NOW - pd.to_timedelta(frame["ts"], unit="h")
    )
    eligible = {item for item in range(71) if item % eligible_share == 0}
    found = _item_neighbours(history, np.array(sorted(eligible), dtype=np.int64))
    assert list(zip(found["item_id"], found["neighbour_id"], strict=True)) == (
        _neighbours_reference(history, eligible)
    )


def test_similarity_graph_sums_each_pair_over_the_history() -> None:
    neighbours = pd.DataFrame(
        {
            "item_id": [1, 1, 2, 3],
            "neighbour_id": [2, 3, 3, 1],
            "similarity": [0.5, 0.25, 0.125, 1.0],
        }
    )
    graph = SimilarityGraph.of(neighbours)
    history = pd.DataFrame({"subject_id": [10, 10, 11, 11], "item_id": [1, 2, 3, 99]})
    pairs = pd.DataFrame({"subject_id": [10, 10, 11, 11, 12], "item_id": [3, 2, 1, 2, 3]})
    # 10: 1→3 (0.25) + 2→3 (0.125); 10→2 via 1 (0.5); 11: 3→1 (1.0), nothing to 2; 12: none.
    assert graph.pair_sums(pairs, history).tolist() == [0.375, 0.5, 1.0, 0.0, 0.0]
