"""The slate policy: invariants on random inputs, and equality with a plain per-subject loop."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_assets.config import load_settings
from recsys_assets.config.settings import SurfaceConfig
from recsys_assets.pipeline.slates import (
    DEFAULT_EXPLORATION_TEMPERATURE,
    SLATE_COLUMNS,
    build_slates,
    exploration_gumbel_noise,
    exploration_slot_positions,
    greedy_capped_keep,
    subject_exploration_seeds,
)
from recsys_assets.rules.categories import UNKNOWN_CATEGORY

COMPARED_COLUMNS = [
    "subject_id",
    "position",
    "item_id",
    "category",
    "creator_id",
    "is_sponsored",
    "score",
    "calibrated",
    "reason_codes",
    "exploration",
    "propensity",
    "exploration_seed",
]
SOURCE_MIXES = ["two_tower", "content|two_tower", "new_item_exploration", "editorial|trending"]
SCORE_TIME = pd.Timestamp("2026-11-27 06:00:00")


def reference_slates(
    scored: pd.DataFrame,
    surface: SurfaceConfig,
    *,
    seed: int,
    high_confidence_threshold: float = 0.5,
    exploration_temperature: float = DEFAULT_EXPLORATION_TEMPERATURE,
) -> pd.DataFrame:
    """The slate policy written plainly: one subject, one candidate at a time."""
    policy = surface.slate_policy
    slots = exploration_slot_positions(surface.display_count, policy.exploration_slots)
    records = scored.reset_index(drop=True).assign(row=lambda frame: frame.index)
    output: list[dict[str, Any]] = []
    for subject_id, candidates in records.groupby("subject_id", sort=True):
        ranked = sorted(
            candidates.to_dict("records"),
            key=lambda r: (-float(r["utility"]), r["item_id"], r["row"]),
        )
        seen: set[int] = set()
        kept: list[dict[str, Any]] = []
        per_category: Counter[Any] = Counter()
        per_creator: Counter[Any] = Counter()
        sponsored_kept = 0
        for candidate in ranked:
            if candidate["item_id"] in seen:
                continue
            seen.add(candidate["item_id"])
            known_category = (
                pd.notna(candidate["category"]) and candidate["category"] != UNKNOWN_CATEGORY
            )
            if (
                (known_category and per_category[candidate["category"]] >= policy.max_per_category)
                or per_creator[candidate["creator_id"]] >= policy.max_per_creator
                or (candidate["is_sponsored"] and sponsored_kept >= policy.sponsored_cap)
            ):
                continue
            kept.append(candidate)
            per_category[candidate["category"]] += 1
            per_creator[candidate["creator_id"]] += 1
            sponsored_kept += bool(candidate["is_sponsored"])

        first: dict[str, Any] | None = None
        if policy.high_confidence_first and kept:
            best = max(
                kept, key=lambda r: -math.inf if pd.isna(r["calibrated"]) else r["calibrated"]
            )
            if best["calibrated"] >= high_confidence_threshold:
                first = best

        pool = [
            r
            for r in kept
            if r["is_exploration_candidate"] and not r["is_sponsored"] and r is not first
        ]
        # Relative temperature: scaled by the subject's top kept utility.
        temperature = exploration_temperature * max(
            max((float(r["utility"]) for r in kept), default=0.0), 1e-6
        )
        subject_seed = int(subject_exploration_seeds(seed, np.array([subject_id]))[0])
        noise = exploration_gumbel_noise(
            np.full(len(pool), subject_seed), np.array([r["item_id"] for r in pool])
        )
        remaining = [
            r
            for r, _ in sorted(
                zip(pool, noise, strict=True),
                key=lambda pair: -(float(pair[0]["utility"]) / temperature + pair[1]),
            )
        ]
        draws: list[tuple[dict[str, Any], float]] = []
        for _ in slots:
            if not remaining or len(draws) >= len(kept) - 1:
                break
            top = max(float(r["utility"]) for r in remaining)
            weights = [math.exp((float(r["utility"]) - top) / temperature) for r in remaining]
            draws.append((remaining[0], weights[0] / sum(weights)))
            remaining = remaining[1:]

        drawn_ids = {id(r) for r, _ in draws}
        fills = ([first] if first else []) + [
            r for r in kept if r is not first and id(r) not in drawn_ids
        ]
        slate: list[tuple[dict[str, Any], bool, float]] = []
        while len(slate) < surface.store_depth and (fills or draws):
            position = len(slate) + 1
            taken_draws = sum(explored for _, explored, _ in slate)
            if draws and (not fills or slots[taken_draws] == position):
                candidate, propensity = draws.pop(0)
                slate.append((candidate, True, propensity))
            else:
                slate.append((fills.pop(0), False, 1.0))

        for position, (candidate, explored, propensity) in enumerate(slate, start=1):
            reasons = [candidate["source_provenance"].split("|")[0]]
            reasons += ["high_confidence"] if candidate is first else []
            reasons += ["exploration"] if explored else []
            reasons += ["sponsored"] if candidate["is_sponsored"] else []
            output.append(
                {
                    "subject_id": subject_id,
                    "position": position,
                    "item_id": candidate["item_id"],
                    "category": candidate["category"],
                    "creator_id": candidate["creator_id"],
                    "is_sponsored": bool(candidate["is_sponsored"]),
                    "score": candidate["utility"],
                    "calibrated": candidate["calibrated"],
                    "reason_codes": "|".join(reasons),
                    "exploration": explored,
                    "propensity": propensity,
                    "exploration_seed": subject_seed,
                }
            )
    return pd.DataFrame(output, columns=COMPARED_COLUMNS)


def surface_with(
    *,
    display_count: int,
    store_depth: int,
    max_per_category: int,
    max_per_creator: int,
    exploration_slots: int,
    sponsored_cap: int,
    high_confidence_first: bool,
) -> SurfaceConfig:
    """The home_feed surface with another, validated, slate layout."""
    base = load_settings().surface("home_feed").model_dump()
    return SurfaceConfig.model_validate(
        {
            **base,
            "display_count": display_count,
            "store_depth": store_depth,
            "candidate_budget": max(store_depth, base["candidate_budget"]),
            "slate_policy": {
                "version": "slate_test",
                "max_per_category": max_per_category,
                "max_per_creator": max_per_creator,
                "exploration_slots": exploration_slots,
                "sponsored_cap": sponsored_cap,
                "high_confidence_first": high_confidence_first,
            },
        }
    )


def scored_frame(rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """scored_candidates rows from (subject, item, utility, calibrated, category, creator,
    sponsored, exploration candidate, provenance) tuples."""
    columns = [
        "subject_id",
        "item_id",
        "utility",
        "calibrated",
        "category",
        "creator_id",
        "is_sponsored",
        "is_exploration_candidate",
        "source_provenance",
    ]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {
            "subject_id": "int64",
            "item_id": "int64",
            "utility": "float32",
            "calibrated": "float32",
            "category": "str",
            "creator_id": "str",
            "is_sponsored": "bool",
            "is_exploration_candidate": "bool",
            "source_provenance": "str",
        }
    )
    return frame.assign(
        item_type="product",
        model_version="model_test",
        feature_set_version="features_test",
        utility_policy_version="utility_v1",
        score_time=SCORE_TIME,
        pipeline_run_id="run_test",
    )


def random_scored(rng: np.random.Generator, subjects: int, per_subject: int) -> pd.DataFrame:
    """Synthetic scored candidates at benchmark-like proportions."""
    size = subjects * per_subject
    categories = np.array([f"category_{k}" for k in range(40)])
    creators = np.array([f"creator_{k}" for k in range(2_000)])
    return scored_frame(
        list(
            zip(
                np.repeat(rng.choice(10**9, subjects, replace=False), per_subject),
                rng.integers(0, 20 * per_subject, size),
                rng.random(size),
                rng.random(size),
                categories[rng.integers(0, categories.size, size)],
                creators[rng.zipf(1.3, size) % creators.size],
                rng.random(size) < 0.1,
                rng.random(size) < 0.1,
                rng.choice(SOURCE_MIXES, size),
                strict=True,
            )
        )
    )


@st.composite
def surfaces(draw: st.DrawFn) -> SurfaceConfig:
    display_count = draw(st.integers(1, 8))
    return surface_with(
        display_count=display_count,
        store_depth=draw(st.integers(display_count + 1, display_count + 12)),
        max_per_category=draw(st.integers(1, 4)),
        max_per_creator=draw(st.integers(1, 3)),
        exploration_slots=draw(st.integers(0, 3)),
        sponsored_cap=draw(st.integers(0, 3)),
        high_confidence_first=draw(st.booleans()),
    )


@st.composite
def scored_candidates(draw: st.DrawFn) -> pd.DataFrame:
    """Few subjects, small item/category/creator vocabularies: duplicates, ties and binding caps."""
    utilities = st.one_of(st.sampled_from([0.2, 0.5, 0.8]), st.floats(0, 1, width=32))
    candidate = st.tuples(
        st.integers(0, 25),
        utilities,
        st.floats(0, 1, width=32),
        st.sampled_from(["books", "music", "games", "garden"]),
        st.sampled_from(["ann", "bob", "cy", "dee", "eve"]),
        st.booleans(),
        st.booleans(),
        st.sampled_from(SOURCE_MIXES),
    )
    subjects = draw(st.lists(st.integers(-5, 10**12), min_size=1, max_size=4, unique=True))
    rows = [
        (subject, *row)
        for subject in subjects
        for row in draw(st.lists(candidate, min_size=0, max_size=30))
    ]
    return scored_frame(rows)


def assert_slate_invariants(slates: pd.DataFrame, surface: SurfaceConfig) -> None:
    policy = surface.slate_policy
    assert list(slates.columns) == list(SLATE_COLUMNS)
    assert slates[["subject_id", "position"]].equals(
        slates[["subject_id", "position"]].sort_values(["subject_id", "position"])
    )
    slots = exploration_slot_positions(surface.display_count, policy.exploration_slots)
    for _, slate in slates.groupby("subject_id"):
        assert slate["position"].tolist() == list(range(1, len(slate) + 1))
        assert len(slate) <= surface.store_depth
        assert not slate["item_id"].duplicated().any()
        assert slate["category"].value_counts().max() <= policy.max_per_category
        assert slate["creator_id"].value_counts().max() <= policy.max_per_creator
        assert slate["is_sponsored"].head(surface.display_count).sum() <= policy.sponsored_cap
        explored = slate[slate["exploration"]]
        assert len(explored) <= policy.exploration_slots
        # at its slot, or earlier when the slate ran out of other items
        assert all(p <= slot for p, slot in zip(explored["position"], slots, strict=False))
        assert (explored["position"] <= surface.display_count).all()
        assert (explored["position"] > 1).all()
        assert ((slate["propensity"] > 0) & (slate["propensity"] <= 1)).all()
        assert (slate.loc[~slate["exploration"], "propensity"] == 1.0).all()
        assert (~explored["is_sponsored"]).all()
        assert slate["exploration_seed"].nunique() == 1
        primary = slate["source_provenance"].str.split("|").str[0]
        codes = slate["reason_codes"].str.split("|")
        assert all(code[0] == source for code, source in zip(codes, primary, strict=True))
        assert slate["exploration"].tolist() == ["exploration" in code for code in codes]
        assert slate["is_sponsored"].tolist() == ["sponsored" in code for code in codes]
        high_confidence = pd.Series(["high_confidence" in code for code in codes])
        assert high_confidence.sum() <= 1
        if high_confidence.any():
            assert high_confidence.iloc[0]
            assert slate["calibrated"].iloc[0] == slate["calibrated"].max()
    assert (slates["slate_policy_version"] == policy.version).all()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scored=scored_candidates(), surface=surfaces(), seed=st.integers(0, 2**32))
def test_slates_hold_the_policy_and_equal_the_per_subject_reference(
    scored: pd.DataFrame, surface: SurfaceConfig, seed: int
) -> None:
    slates = build_slates(scored, surface, seed=seed)

    assert_slate_invariants(slates, surface)
    expected = reference_slates(scored, surface, seed=seed)
    pd.testing.assert_frame_equal(
        slates[COMPARED_COLUMNS].reset_index(drop=True),
        expected.astype(slates[COMPARED_COLUMNS].dtypes.to_dict()),
        check_exact=False,
        rtol=1e-9,
    )
    pd.testing.assert_frame_equal(slates, build_slates(scored, surface, seed=seed))


@settings(max_examples=20, deadline=None)
@given(
    scored=scored_candidates(),
    surface=surfaces(),
    seed=st.integers(0, 2**32),
    shard_count=st.integers(2, 3),
)
def test_shards_processed_separately_equal_one_pass(
    scored: pd.DataFrame, surface: SurfaceConfig, seed: int, shard_count: int
) -> None:
    whole = build_slates(scored, surface, seed=seed)
    shard_of = scored["subject_id"] % shard_count
    shards = [
        build_slates(scored[shard_of == shard], surface, seed=seed) for shard in range(shard_count)
    ]

    combined = pd.concat(shards).sort_values(["subject_id", "position"], ignore_index=True)
    pd.testing.assert_frame_equal(combined, whole)


def test_row_order_and_shard_boundaries_do_not_change_large_slates() -> None:
    scored = random_scored(np.random.default_rng(3), subjects=60, per_subject=150)
    scored = scored.drop_duplicates(["subject_id", "item_id"])
    surface = load_settings().surface("home_feed")
    whole = build_slates(scored, surface, seed=11)

    shuffled = scored.sample(frac=1.0, random_state=5)
    pd.testing.assert_frame_equal(build_slates(shuffled, surface, seed=11), whole)
    subjects = scored["subject_id"].unique()
    sharded = pd.concat(
        build_slates(scored[scored["subject_id"].isin(part)], surface, seed=11)
        for part in np.array_split(subjects, 4)
    ).sort_values(["subject_id", "position"], ignore_index=True)
    pd.testing.assert_frame_equal(sharded, whole)
    assert whole["exploration"].groupby(whole["subject_id"]).sum().eq(2).all()
    assert not whole.equals(build_slates(scored, surface, seed=12))


def test_large_random_slates_equal_the_reference() -> None:
    scored = random_scored(np.random.default_rng(8), subjects=20, per_subject=150)
    for name in ("home_feed", "email_daily", "push"):
        surface = load_settings().surface(name)
        slates = build_slates(scored, surface, seed=2)
        assert_slate_invariants(slates, surface)
        expected = reference_slates(scored, surface, seed=2)
        pd.testing.assert_frame_equal(
            slates[COMPARED_COLUMNS],
            expected.astype(slates[COMPARED_COLUMNS].dtypes.to_dict()),
            check_exact=False,
            rtol=1e-9,
        )


def test_greedy_caps_count_only_kept_items_through_a_long_chain() -> None:
    """Each skip un-skips the next item: a plain cumcount over candidates gets it wrong."""
    chain = 30
    rows = [
        (1, item, 1.0 - item / 100, 0.1, f"category_{(item + 1) // 2}", f"creator_{item // 2}")
        for item in range(chain)
    ]
    scored = scored_frame(
        [(*row, False, False, "two_tower") for row in rows]
        + [(2, 0, 0.9, 0.1, "solo", "solo", False, False, "two_tower")]
    )
    surface = surface_with(
        display_count=5,
        store_depth=40,
        max_per_category=1,
        max_per_creator=1,
        exploration_slots=0,
        sponsored_cap=0,
        high_confidence_first=False,
    )

    slates = build_slates(scored, surface, seed=0)

    expected = reference_slates(scored, surface, seed=0)
    assert slates[slates["subject_id"] == 1]["item_id"].tolist() == list(range(0, chain, 2))
    pd.testing.assert_frame_equal(
        slates[COMPARED_COLUMNS], expected.astype(slates[COMPARED_COLUMNS].dtypes.to_dict())
    )
    subject_code = np.array([0] * chain + [1])
    category = np.array([(item + 1) // 2 for item in range(chain)] + [10**6])
    creator = np.array([item // 2 for item in range(chain)] + [10**6])
    everything = np.ones(chain + 1, dtype=bool)
    keep, passes = greedy_capped_keep(
        subject_code, [(everything, category, 1), (everything, creator, 1)]
    )
    assert keep[:chain].tolist() == [item % 2 == 0 for item in range(chain)]
    assert passes > chain // 2


def test_high_confidence_item_goes_first_only_above_threshold() -> None:
    scored = scored_frame(
        [
            (7, 1, 0.9, 0.40, "books", "ann", False, False, "two_tower"),
            (7, 2, 0.8, 0.70, "music", "bob", False, False, "content|two_tower"),
            (7, 3, 0.7, 0.65, "games", "cy", False, False, "trending"),
            (8, 1, 0.9, 0.30, "books", "ann", False, False, "two_tower"),
            (8, 2, 0.8, 0.45, "music", "bob", False, False, "two_tower"),
        ]
    )
    surface = surface_with(
        display_count=2,
        store_depth=5,
        max_per_category=2,
        max_per_creator=2,
        exploration_slots=0,
        sponsored_cap=0,
        high_confidence_first=True,
    )

    slates = build_slates(scored, surface, seed=0, high_confidence_threshold=0.5)

    first = slates.groupby("subject_id").first()
    assert first.loc[7, "item_id"] == 2
    assert first.loc[7, "reason_codes"] == "content|high_confidence"
    assert slates[slates["subject_id"] == 7]["item_id"].tolist() == [2, 1, 3]
    assert slates[slates["subject_id"] == 8]["item_id"].tolist() == [1, 2]
    assert not slates[slates["subject_id"] == 8]["reason_codes"].str.contains("high").any()


def test_sponsored_items_beyond_the_cap_are_dropped() -> None:
    scored = scored_frame(
        [
            (1, item, 1 - item / 10, 0.2, f"c{item}", f"r{item}", True, False, "editorial|trending")
            for item in range(4)
        ]
        + [
            (1, 10 + item, 0.5 - item / 100, 0.2, f"d{item}", f"s{item}", False, False, "two_tower")
            for item in range(4)
        ]
    )
    surface = surface_with(
        display_count=3,
        store_depth=8,
        max_per_category=5,
        max_per_creator=5,
        exploration_slots=0,
        sponsored_cap=1,
        high_confidence_first=False,
    )

    slates = build_slates(scored, surface, seed=0)

    assert slates["item_id"].tolist() == [0, 10, 11, 12, 13]
    assert slates["reason_codes"].tolist()[:2] == ["editorial|sponsored", "two_tower"]
    only_sponsored = scored[scored["is_sponsored"]]
    no_sponsored = surface.model_copy(
        update={"slate_policy": surface.slate_policy.model_copy(update={"sponsored_cap": 0})}
    )
    assert build_slates(only_sponsored, no_sponsored, seed=0).empty


def test_exploration_draws_follow_the_logged_propensities() -> None:
    """4,000 subjects with the same pool: draw frequencies match the Plackett-Luce law."""
    subjects = 4_000
    pool_utilities = [0.30, 0.25, 0.20, 0.05]
    rows = [
        (subject, item, utility, 0.1, f"c{item}", f"r{item}", False, True, "new_item_exploration")
        for subject in range(subjects)
        for item, utility in enumerate(pool_utilities)
    ]
    surface = surface_with(
        display_count=6,
        store_depth=8,
        max_per_category=5,
        max_per_creator=5,
        exploration_slots=1,
        sponsored_cap=0,
        high_confidence_first=False,
    )

    slates = build_slates(scored_frame(rows), surface, seed=42, exploration_temperature=0.1)

    explored = slates[slates["exploration"]]
    assert len(explored) == subjects
    assert (explored["position"] == 4).all()
    # The temperature is relative to the subject's top utility (0.30 here).
    utilities = np.array(pool_utilities, dtype=np.float32).astype(np.float64)
    weights = np.exp(utilities / (0.1 * utilities.max()))
    expected = weights / weights.sum()
    frequency = explored["item_id"].value_counts(normalize=True).reindex(range(4), fill_value=0)
    tolerance = 4 * np.sqrt(expected * (1 - expected) / subjects)
    assert np.all(np.abs(frequency.to_numpy() - expected) < tolerance)
    logged = explored.groupby("item_id")["propensity"].first()
    np.testing.assert_allclose(logged.to_numpy(), expected[logged.index], rtol=1e-12)


def test_exploration_slots_spread_over_the_display_never_first() -> None:
    assert exploration_slot_positions(20, 2) == (7, 14)
    assert exploration_slot_positions(6, 1) == (4,)
    assert exploration_slot_positions(1, 3) == ()
    assert exploration_slot_positions(3, 5) == (2, 3)
    for display_count in range(1, 30):
        for slots in range(0, 6):
            positions = exploration_slot_positions(display_count, slots)
            assert len(positions) == min(slots, display_count - 1)
            assert all(2 <= p <= display_count for p in positions)
            assert list(positions) == sorted(set(positions))


def test_empty_input_gives_an_empty_slates_table() -> None:
    scored = scored_frame([])

    slates = build_slates(scored, load_settings().surface("email_daily"), seed=0)

    assert slates.empty
    assert list(slates.columns) == list(SLATE_COLUMNS)
    assert slates["position"].dtype == np.int64


def test_candidate_policy_version_passes_through() -> None:
    scored = scored_frame([(1, 1, 0.5, 0.5, "books", "ann", False, False, "two_tower")])

    slates = build_slates(
        scored.assign(candidate_policy_version="candidates_v1"),
        load_settings().surface("email_daily"),
        seed=0,
    )

    assert slates["candidate_policy_version"].tolist() == ["candidates_v1"]


def test_missing_columns_and_missing_utilities_are_named() -> None:
    scored = scored_frame([(1, 1, 0.5, 0.5, "books", "ann", False, False, "two_tower")])
    surface = load_settings().surface("email_daily")

    with pytest.raises(ValueError, match=r"lack columns \['creator_id'\]"):
        build_slates(scored.drop(columns="creator_id"), surface, seed=0)
    with pytest.raises(ValueError, match="1 scored candidates have a missing or infinite utility"):
        build_slates(scored.assign(utility=np.nan), surface, seed=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_slates(scored, surface, seed=0, exploration_temperature=0.0)


def test_uncategorised_items_are_not_capped_as_one_category() -> None:
    """An import without categories gives every item 'unknown': lists still fill."""
    rows = [
        (0, item, 1.0 - item / 100, 0.1, UNKNOWN_CATEGORY, f"r{item}", False, False, "two_tower")
        for item in range(12)
    ]
    surface = surface_with(
        display_count=4,
        store_depth=10,
        max_per_category=2,
        max_per_creator=5,
        exploration_slots=0,
        sponsored_cap=0,
        high_confidence_first=False,
    )
    slates = build_slates(scored_frame(rows), surface, seed=0)
    assert len(slates) == 10
