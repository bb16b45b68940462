"""Slates: a surface's slate policy applied to scored candidates, all subjects at once.

The policy, per subject, in this order:

1. **Rank and dedupe.** Candidates are ranked by utility (descending), ties by item_id, then
   input order; a duplicated item keeps its best-ranked row.
2. **Caps, greedy in rank order.** An item is kept unless, among the items *kept* above it,
   its category already has `max_per_category` (known categories only:
   `rules.categories`), its creator `max_per_creator`, or (for a
   sponsored item) `sponsored_cap` sponsored items are kept. Sponsored items beyond the cap
   are dropped rather than demoted: when serving's final check rejects items it fills the
   display from deeper in the stored list, so a demoted sponsored item could surface there.
   Dropping keeps "at most `sponsored_cap` sponsored items in the top `display_count`" true
   for every list serving can build from the slate.
3. **High confidence first** (surfaces with `high_confidence_first`): the kept item with the
   highest calibrated prediction (ties: best rank) goes to position 1, reason
   `high_confidence`, if that prediction is at least the threshold; else normal order.
4. **Exploration.** The pool is the kept, non-sponsored `is_exploration_candidate` items
   (minus the high-confidence item). Up to `exploration_slots` items (at most
   `display_count - 1`, and always leaving the subject one kept item that was not drawn, so
   position 1 is never explored) are drawn without replacement with probability proportional to
   `softmax(utility / (temperature × the subject's top utility))` over what is left of the
   pool, i.e. Plackett-Luce,
   sampled with the Gumbel-top-k trick. `propensity` is the draw's probability at its step.
5. **Layout.** Drawn items take fixed positions spread evenly over the display and never
   position 1 (`exploration_slot_positions`); the high-confidence item and the remaining
   kept items fill the other positions in rank order. A subject with too few other items gets
   its drawn items right after them (still never at 1). The first `store_depth` are stored.

The draws are reproducible per subject regardless of shard boundaries and of row order: the
subject's `exploration_seed` is a SplitMix64 hash of (seed, subject_id), and each pool item's
Gumbel noise is a hash of (exploration_seed, item_id) — a counter-based generator, so no
per-subject generator object (and no per-subject Python loop) is needed.

The greedy caps are computed without a loop over subjects or candidates, as the fixpoint of
"keep an item iff fewer than cap items of each of its groups are kept above it". Each pass
computes, for all rows at once, a cumulative count of kept items per (subject, group) in rank
order from the previous pass's keep flags. An item's decision depends only on items above it,
so after pass t the first t items of every subject are final and the iteration reaches the
unique fixpoint — exactly the greedy result — in at most (candidates per subject + 1) passes;
on pipeline-shaped data (500 candidates, skewed creators) it settles in 8-13. A subject whose
flags did not change in a pass is at the fixpoint and drops out of the following passes, so a
subject with a long chain of interacting caps costs only its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from recsys_assets.config.settings import SlatePolicyConfig, SurfaceConfig
from recsys_assets.pipeline.runs import (
    order_within_groups,
    rank_within_runs,
    run_lengths,
    run_starts,
)
from recsys_assets.pipeline.text import plain_text_columns
from recsys_assets.rules.categories import category_capped

LINEAGE_COLUMNS = (
    "model_version",
    "feature_set_version",
    "utility_policy_version",
    "score_time",
    "pipeline_run_id",
)
"""Lineage carried from scored_candidates onto every slate row."""

OPTIONAL_LINEAGE_COLUMNS = ("candidate_policy_version",)
"""Passed through when the scored candidates carry them (published lists need them)."""

SCORED_COLUMNS = (
    "subject_id",
    "item_id",
    "utility",
    "calibrated",
    "item_type",
    "category",
    "creator_id",
    "is_sponsored",
    "is_exploration_candidate",
    "source_provenance",
    *LINEAGE_COLUMNS,
)
"""Columns build_slates reads from scored_candidates."""

SLATE_COLUMNS = (
    "subject_id",
    "position",
    "item_id",
    "item_type",
    "category",
    "creator_id",
    "is_sponsored",
    "score",
    "calibrated",
    "reason_codes",
    "source_provenance",
    "exploration",
    "propensity",
    "exploration_seed",
    "slate_policy_version",
    *LINEAGE_COLUMNS,
)
"""The slates table (docs/DATA_MODEL.md), in order; optional lineage columns follow."""

REASON_HIGH_CONFIDENCE = "high_confidence"
REASON_EXPLORATION = "exploration"
REASON_SPONSORED = "sponsored"
DEFAULT_EXPLORATION_TEMPERATURE = 0.1
"""Softmax temperature over utilities, relative to the subject's top utility: an item better
by a tenth of that top is e (~2.7) times more likely to be explored. Relative, because
calibrated probabilities are small on sparse data (a fixed 0.1 made every draw uniform, so
exploration slots went to the least relevant items of the pool)."""
_MIN_SCALE = 1e-6

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_SEED_MASK = np.uint64(2**63 - 1)


def exploration_slot_positions(display_count: int, exploration_slots: int) -> tuple[int, ...]:
    """1-based positions of the exploration slots: evenly spread, never 1, within the display.

    With s = min(exploration_slots, display_count - 1) slots, slot j sits at
    floor((j + 1) * display_count / (s + 1)) + 1, e.g. 7 and 14 for 2 slots in 20.
    """
    slots = max(0, min(exploration_slots, display_count - 1))
    return tuple((j + 1) * display_count // (slots + 1) + 1 for j in range(slots))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed hash of uint64 values (wraps mod 2**64)."""
    mixed = values + _GOLDEN_GAMMA
    mixed = (mixed ^ (mixed >> np.uint64(30))) * _MIX_1
    mixed = (mixed ^ (mixed >> np.uint64(27))) * _MIX_2
    return mixed ^ (mixed >> np.uint64(31))


def subject_exploration_seeds(seed: int, subject_ids: np.ndarray) -> np.ndarray:
    """Each subject's exploration seed (int64 >= 0): a hash of (seed, subject_id)."""
    run_key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    subjects = np.asarray(subject_ids, dtype=np.int64).view(np.uint64)
    return (_splitmix64(subjects ^ run_key) & _SEED_MASK).astype(np.int64)


def exploration_gumbel_noise(exploration_seeds: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """Standard Gumbel noise for each (subject exploration seed, item_id) pair, float64.

    Counter-based: the value depends only on the pair, so a replay needs only the logged
    seed and the pool, not the order or sharding the pipeline used.
    """
    seeds = np.asarray(exploration_seeds, dtype=np.int64).view(np.uint64)
    items = np.asarray(item_ids, dtype=np.int64).view(np.uint64)
    bits = _splitmix64(seeds ^ _splitmix64(items))
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return -np.log(-np.log(uniform))


@dataclass(frozen=True)
class _Cap:
    """One greedy cap: the ranked rows it constrains, ordered by (group, rank), and its limit."""

    rows: np.ndarray
    group: np.ndarray
    group_start: np.ndarray
    limit: int

    @classmethod
    def over(cls, rows: np.ndarray, group: np.ndarray, limit: int) -> _Cap:
        starts = run_starts(group)
        return cls(rows, group, np.repeat(starts, run_lengths(starts, group.size)), limit)

    def blocked_rows(self, keep: np.ndarray) -> np.ndarray:
        """Rows whose group already has `limit` kept rows ranked above them."""
        kept = keep[self.rows].astype(np.int64)
        kept_before = np.cumsum(kept) - kept
        kept_before -= kept_before[self.group_start]
        return self.rows[kept_before >= self.limit]

    def restricted_to(self, entries: np.ndarray) -> _Cap:
        """The cap over a subset of entries that consists of whole groups."""
        return _Cap.over(self.rows[entries], self.group[entries], self.limit)


def greedy_capped_keep(
    subject_code: np.ndarray,
    cap_groups: list[tuple[np.ndarray, np.ndarray, int]],
) -> tuple[np.ndarray, int]:
    """Keep flags of the greedy multi-cap selection, and the number of passes it took.

    Rows are in rank order, grouped by `subject_code` (0..S-1, non-decreasing). Each cap is
    (applies, group, limit): the boolean rows it constrains, their group code (any int64,
    groups never span subjects) and the most rows of one group that may be kept.
    """
    size = subject_code.size
    caps = []
    for applies, group, limit in cap_groups:
        rows = np.flatnonzero(applies)
        by_group = np.argsort(group[rows], kind="stable")
        caps.append(_Cap.over(rows[by_group], group[rows][by_group], limit))
    keep = np.ones(size, dtype=bool)
    active_rows = np.arange(size)
    passes = 0
    while active_rows.size:
        passes += 1
        blocked = np.zeros(size, dtype=bool)
        for cap in caps:
            blocked[cap.blocked_rows(keep)] = True
        proposed = ~blocked[active_rows]
        changed = active_rows[proposed != keep[active_rows]]
        keep[active_rows] = proposed
        unsettled = np.zeros(int(subject_code[-1]) + 1, dtype=bool)
        unsettled[subject_code[changed]] = True
        active_rows = active_rows[unsettled[subject_code[active_rows]]]
        caps = [cap.restricted_to(unsettled[subject_code[cap.rows]]) for cap in caps]
    return keep, passes


def _check_input(scored: pd.DataFrame, temperature: float) -> None:
    missing = [column for column in SCORED_COLUMNS if column not in scored.columns]
    if missing:
        raise ValueError(
            f"build_slates: scored candidates lack columns {missing}; "
            "pass the scored_candidates table described in docs/DATA_MODEL.md"
        )
    utility = scored["utility"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(utility)
    if bad.any():
        sample = scored.loc[bad, ["subject_id", "item_id"]].head(5).to_dict("records")
        raise ValueError(
            f"build_slates: {int(bad.sum())} scored candidates have a missing or infinite "
            f"utility, e.g. {sample}; fix the scoring step so every candidate has a utility"
        )
    if not temperature > 0:
        raise ValueError(f"build_slates: exploration temperature must be > 0, got {temperature}")


def _rank_order(subject_code: np.ndarray, utility: np.ndarray, item_id: np.ndarray) -> np.ndarray:
    """Row order by (subject, utility desc, item_id, input order)."""
    order = order_within_groups(subject_code, -utility)
    ranked_subject = subject_code[order]
    ranked_utility = utility[order]
    tie = (ranked_subject[1:] == ranked_subject[:-1]) & (ranked_utility[1:] == ranked_utility[:-1])
    if tie.any():
        in_tie = np.zeros(order.size, dtype=bool)
        in_tie[1:] |= tie
        in_tie[:-1] |= tie
        tied = np.flatnonzero(in_tie)
        run = np.cumsum(np.concatenate(([True], ~tie[tied[1:] - 1])))
        within = np.lexsort((order[tied], item_id[order[tied]], run))
        order[tied] = order[tied][within]
    return order


def _reason_codes(
    provenance: pd.Series, high_confidence: np.ndarray, explored: np.ndarray, sponsored: np.ndarray
) -> np.ndarray:
    """`primary source|high_confidence|exploration|sponsored`, tokens present where they apply."""
    source_code, sources = pd.factorize(provenance, use_na_sentinel=False)
    primaries = [value.split("|", 1)[0] if isinstance(value, str) else "" for value in sources]
    flags = high_confidence.astype(np.int64) * 4 + explored * 2 + sponsored.astype(np.int64)
    combo, inverse = np.unique(source_code * 8 + flags, return_inverse=True)
    texts = np.empty(combo.size, dtype=object)
    for index, value in enumerate(combo.tolist()):
        tokens = [primaries[value // 8]]
        tokens += [REASON_HIGH_CONFIDENCE] if value & 4 else []
        tokens += [REASON_EXPLORATION] if value & 2 else []
        tokens += [REASON_SPONSORED] if value & 1 else []
        texts[index] = "|".join(token for token in tokens if token)
    return texts[inverse.reshape(-1)]


def _slate_dtypes(scored: pd.DataFrame) -> dict[str, object]:
    """Column dtypes of the slates table; pass-through columns keep the scored dtypes, coded
    text (pipeline/text.py) as plain text."""
    dtypes: dict[str, object] = {column: _plain(scored[column].dtype) for column in SCORED_COLUMNS}
    dtypes.update(score=scored["utility"].dtype, position="int64", reason_codes="str")
    dtypes.update(subject_id="int64", item_id="int64", is_sponsored="bool", exploration="bool")
    dtypes.update(propensity="float64", exploration_seed="int64", slate_policy_version="str")
    columns = [*SLATE_COLUMNS, *(c for c in OPTIONAL_LINEAGE_COLUMNS if c in scored.columns)]
    dtypes.update(
        {c: _plain(scored[c].dtype) for c in OPTIONAL_LINEAGE_COLUMNS if c in scored.columns}
    )
    return {column: dtypes[column] for column in columns}


def _plain(dtype: object) -> object:
    return "str" if isinstance(dtype, pd.CategoricalDtype) else dtype


def _kept_by_caps(
    candidates: SlateCandidates, ranked: np.ndarray, subject: np.ndarray, policy: SlatePolicyConfig
) -> np.ndarray:
    """Positions in the ranked candidates that survive the greedy category, creator and
    sponsored caps."""
    category_code = candidates.category_code[ranked]
    creator_code = candidates.creator_code[ranked]
    categories = int(category_code.max(initial=-1)) + 1
    creators = int(creator_code.max(initial=-1)) + 1
    sponsored = candidates.is_sponsored[ranked]
    everything = np.ones(ranked.size, dtype=bool)
    keep, _ = greedy_capped_keep(
        subject,
        [
            (
                candidates.category_capped[ranked],
                subject * categories + category_code,
                policy.max_per_category,
            ),
            (everything, subject * creators + creator_code, policy.max_per_creator),
            (sponsored, subject, policy.sponsored_cap),
        ],
    )
    return np.flatnonzero(keep)


def _high_confidence_items(
    calibrated: np.ndarray, subject: np.ndarray, threshold: float
) -> np.ndarray:
    """Mask of each subject's first item with the top calibrated prediction, if >= threshold."""
    chosen = np.zeros(calibrated.size, dtype=bool)
    if calibrated.size == 0:
        return chosen
    calibrated = np.where(np.isnan(calibrated), -np.inf, calibrated)
    starts = run_starts(subject)
    best = np.repeat(np.maximum.reduceat(calibrated, starts), run_lengths(starts, subject.size))
    at_best = np.flatnonzero(calibrated == best)
    first_best = at_best[run_starts(subject[at_best])]
    chosen[first_best[calibrated[first_best] >= threshold]] = True
    return chosen


def _utility_scale(utility: np.ndarray, subject: np.ndarray) -> np.ndarray:
    """Per row, its subject's top utility (rows grouped by subject), at least _MIN_SCALE."""
    if utility.size == 0:
        return np.ones(0)
    starts = run_starts(subject)
    top = np.maximum.reduceat(np.nan_to_num(utility, nan=0.0), starts)
    return np.repeat(np.maximum(top, _MIN_SCALE), run_lengths(starts, subject.size))


def _draw_exploration(
    in_pool: np.ndarray,
    utility: np.ndarray,
    item_id: np.ndarray,
    subject: np.ndarray,
    seeds: np.ndarray,
    draws: int,
    temperature: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plackett-Luce draws without replacement from each subject's pool (Gumbel-top-k).

    `temperature` is per row (constant within a subject).

    Arrays are aligned, grouped by subject. Returns the drawn rows (by subject, then draw
    step), their draw steps, and a propensity per row: the drawn item's probability at its
    step, 1.0 for every row not drawn. At most `draws` per subject, and never all of a
    subject's rows, so position 1 always holds an item that was not drawn.
    """
    pool = np.flatnonzero(in_pool)
    pool_utility = utility[pool]
    noise = exploration_gumbel_noise(seeds[pool], item_id[pool])
    pool_temperature = temperature[pool]
    by_key = np.lexsort((-(pool_utility / pool_temperature + noise), subject[pool]))
    pool, pool_utility = pool[by_key], pool_utility[by_key]
    pool_temperature = pool_temperature[by_key]
    step = rank_within_runs(subject[pool])
    rows_per_subject = np.bincount(subject, minlength=int(subject.max(initial=-1)) + 1)
    limit = np.minimum(draws, rows_per_subject - 1)[subject[pool]]
    propensity = np.ones(utility.size)
    for current in range(draws):
        remaining = np.flatnonzero((step >= current) & (limit > current))
        if remaining.size == 0:
            break
        starts = run_starts(subject[pool[remaining]])
        lengths = run_lengths(starts, remaining.size)
        top = np.repeat(np.maximum.reduceat(pool_utility[remaining], starts), lengths)
        weight = np.exp((pool_utility[remaining] - top) / pool_temperature[remaining])
        propensity[pool[remaining[starts]]] = weight[starts] / np.add.reduceat(weight, starts)
    drawn = step < limit
    return pool[drawn], step[drawn], propensity


def _layout(
    subject: np.ndarray,
    high_confidence: np.ndarray,
    drawn: np.ndarray,
    drawn_step: np.ndarray,
    slot_positions: np.ndarray,
    store_depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the stored slates, by (subject, position), and their 1-based positions.

    Non-slot items are the high-confidence item then the rest in rank order; drawn item j
    goes right before the non-slot item with index slot_positions[j] - 1 - j, which puts it
    at its slot, or right after the non-slot items when the subject runs out of them.
    """
    fills = np.setdiff1d(np.arange(subject.size), drawn, assume_unique=True)
    fills = fills[np.lexsort((~high_confidence[fills], subject[fills]))]
    fill_index = rank_within_runs(subject[fills])
    fills, fill_index = fills[fill_index < store_depth], fill_index[fill_index < store_depth]
    rows = np.concatenate((fills, drawn))
    before = np.concatenate((fill_index, slot_positions[drawn_step] - 1 - drawn_step))
    slot_first = np.concatenate((np.ones(fills.size, np.int64), np.zeros(drawn.size, np.int64)))
    draw_order = np.concatenate((np.zeros(fills.size, np.int64), drawn_step))
    rows = rows[np.lexsort((draw_order, slot_first, before, subject[rows]))]
    position = rank_within_runs(subject[rows]) + 1
    stored = position <= store_depth
    return rows[stored], position[stored]


@dataclass(frozen=True)
class SlateCandidates:
    """What the slate policy reads of scored candidates, as arrays (a frame's columns, or
    one subject's shortlist online, without a DataFrame per request)."""

    subject_id: np.ndarray
    item_id: np.ndarray
    utility: np.ndarray
    calibrated: np.ndarray
    category_code: np.ndarray
    """Codes of the categories (equal code, equal category; any int64 >= 0)."""
    category_capped: np.ndarray
    """Where max_per_category applies (`rules.categories.category_capped`)."""
    creator_code: np.ndarray
    is_sponsored: np.ndarray
    is_exploration_candidate: np.ndarray

    @classmethod
    def of(cls, scored: pd.DataFrame) -> SlateCandidates:
        # Factorize whole columns (Arrow strings encode fast there).
        category_code, _ = pd.factorize(scored["category"], use_na_sentinel=False)
        creator_code, _ = pd.factorize(scored["creator_id"], use_na_sentinel=False)
        return cls(
            subject_id=scored["subject_id"].to_numpy(dtype=np.int64),
            item_id=scored["item_id"].to_numpy(dtype=np.int64),
            utility=scored["utility"].to_numpy(dtype=np.float64),
            calibrated=scored["calibrated"].to_numpy(dtype=np.float64, na_value=np.nan),
            category_code=category_code.astype(np.int64),
            category_capped=category_capped(scored["category"]),
            creator_code=creator_code.astype(np.int64),
            is_sponsored=scored["is_sponsored"].to_numpy(dtype=bool),
            is_exploration_candidate=scored["is_exploration_candidate"].to_numpy(dtype=bool),
        )


@dataclass(frozen=True)
class SlateSelection:
    """The policy's decision: which candidate rows make the slates, in (subject, position)
    order, and per slate row its position and why it is there."""

    rows: np.ndarray
    position: np.ndarray
    high_confidence: np.ndarray
    explored: np.ndarray
    propensity: np.ndarray
    exploration_seed: np.ndarray
    sponsored: np.ndarray


def select_slates(
    candidates: SlateCandidates,
    surface: SurfaceConfig,
    *,
    seed: int,
    high_confidence_threshold: float = 0.5,
    exploration_temperature: float = DEFAULT_EXPLORATION_TEMPERATURE,
) -> SlateSelection:
    """The slate policy (module docstring) over `candidates`: the one implementation that
    batch slates and serving's online rerank share. Candidates need not be grouped."""
    policy = surface.slate_policy
    subject_code, subject_ids = pd.factorize(candidates.subject_id, sort=True)
    utility = candidates.utility
    item_id = candidates.item_id
    order = _rank_order(subject_code, utility, item_id)
    # One int64 key per (subject, item), hashed: no DataFrame per call (online, per request).
    item_code, items = pd.factorize(item_id[order])
    duplicate = pd.Index(subject_code[order].astype(np.int64) * len(items) + item_code).duplicated()
    ranked = order[~duplicate]  # input row of each deduped candidate, by rank

    # From here on, rows are the kept candidates: `source` is their input row.
    source = ranked[_kept_by_caps(candidates, ranked, subject_code[ranked], policy)]
    subject = subject_code[source]
    high_confidence = np.zeros(source.size, dtype=bool)
    if policy.high_confidence_first:
        high_confidence = _high_confidence_items(
            candidates.calibrated[source], subject, high_confidence_threshold
        )

    seeds = subject_exploration_seeds(seed, subject_ids)[subject]
    slot_positions = np.array(
        exploration_slot_positions(surface.display_count, policy.exploration_slots),
        dtype=np.int64,
    )
    sponsored = candidates.is_sponsored[source]
    in_pool = candidates.is_exploration_candidate[source]
    drawn, drawn_step, propensity = _draw_exploration(
        in_pool & ~sponsored & ~high_confidence,
        utility[source],
        item_id[source],
        subject,
        seeds,
        slot_positions.size,
        exploration_temperature * _utility_scale(utility[source], subject),
    )
    explored = np.zeros(source.size, dtype=bool)
    explored[drawn] = True
    rows, position = _layout(
        subject, high_confidence, drawn, drawn_step, slot_positions, surface.store_depth
    )
    return SlateSelection(
        rows=source[rows],
        position=position,
        high_confidence=high_confidence[rows],
        explored=explored[rows],
        propensity=propensity[rows],
        exploration_seed=seeds[rows],
        sponsored=sponsored[rows],
    )


def build_slates(
    scored: pd.DataFrame,
    surface: SurfaceConfig,
    *,
    seed: int,
    high_confidence_threshold: float = 0.5,
    exploration_temperature: float = DEFAULT_EXPLORATION_TEMPERATURE,
) -> pd.DataFrame:
    """The slates table for `scored` candidates under `surface`'s slate policy.

    Rows sorted by (subject_id, position), positions dense from 1, at most store_depth per
    subject; see the module docstring for the policy. Same input and seed, same output,
    whether the subjects come in one frame or in shards, in any row order.
    """
    _check_input(scored, exploration_temperature)
    if scored.empty:
        return pd.DataFrame(
            {column: pd.Series(dtype=dtype) for column, dtype in _slate_dtypes(scored).items()}
        )
    selection = select_slates(
        SlateCandidates.of(scored),
        surface,
        seed=seed,
        high_confidence_threshold=high_confidence_threshold,
        exploration_temperature=exploration_temperature,
    )
    passed_on = [c for c in (*SCORED_COLUMNS, *OPTIONAL_LINEAGE_COLUMNS) if c in scored]
    taken = plain_text_columns(scored[passed_on].take(selection.rows).reset_index(drop=True))
    slates = pd.DataFrame(
        {
            "subject_id": taken["subject_id"],
            "position": selection.position,
            "item_id": taken["item_id"],
            "item_type": taken["item_type"],
            "category": taken["category"],
            "creator_id": taken["creator_id"],
            "is_sponsored": selection.sponsored,
            "score": taken["utility"],
            "calibrated": taken["calibrated"],
            "reason_codes": _reason_codes(
                taken["source_provenance"],
                selection.high_confidence,
                selection.explored,
                selection.sponsored,
            ),
            "source_provenance": taken["source_provenance"],
            "exploration": selection.explored,
            "propensity": selection.propensity,
            "exploration_seed": selection.exploration_seed,
            "slate_policy_version": surface.slate_policy.version,
        }
    )
    for column in (*LINEAGE_COLUMNS, *(c for c in OPTIONAL_LINEAGE_COLUMNS if c in scored)):
        slates[column] = taken[column]
    return slates.astype(_slate_dtypes(scored))
