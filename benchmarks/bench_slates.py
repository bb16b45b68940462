"""Benchmark: vectorized build_slates vs the per-subject reference loop of the tests.

    python -m benchmarks.bench_slates [--subjects 2000] [--candidates 500] [--surface home_feed]

Times build_slates on subjects × candidates synthetic scored rows (best of --repeats), times
the plain per-subject loop (recsys_assets_tests.pipeline.test_slates.reference_slates) on the
first --reference-subjects subjects, checks both give the same slates there, and reports the
per-subject speed ratio and peak RSS. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import pandas as pd

from recsys_assets.config import load_settings
from recsys_assets.pipeline.slates import build_slates
from recsys_assets_tests.pipeline.test_slates import COMPARED_COLUMNS, reference_slates

SOURCE_MIXES = np.array(
    ["two_tower", "content|two_tower", "item_to_item|two_tower", "new_item_exploration", "trending"]
)


def synthetic_scored(subjects: int, candidates: int, seed: int) -> pd.DataFrame:
    """Scored candidates shaped like the pipeline's: 40 categories, Zipf-skewed creators,
    ~10% sponsored and ~10% exploration candidates, a few duplicated items per subject."""
    rng = np.random.default_rng(seed)
    size = subjects * candidates
    categories = pd.array([f"category_{k}" for k in range(40)], dtype="str")
    creators = pd.array([f"creator_{k}" for k in range(5_000)], dtype="str")
    return pd.DataFrame(
        {
            "subject_id": np.repeat(rng.choice(10**9, subjects, replace=False), candidates),
            "item_id": rng.integers(0, 50 * candidates, size),
            "utility": rng.beta(2, 8, size).astype(np.float32),
            "calibrated": rng.beta(2, 8, size).astype(np.float32),
            "item_type": pd.array(["product"] * size, dtype="str"),
            "category": categories.take(rng.integers(0, len(categories), size)),
            "creator_id": creators.take(rng.zipf(1.4, size) % len(creators)),
            "is_sponsored": rng.random(size) < 0.1,
            "is_exploration_candidate": rng.random(size) < 0.1,
            "source_provenance": pd.array(SOURCE_MIXES[rng.integers(0, 5, size)], dtype="str"),
            "model_version": "model_bench",
            "feature_set_version": "features_bench",
            "utility_policy_version": "utility_v1",
            "score_time": pd.Timestamp("2026-11-27 06:00:00"),
            "pipeline_run_id": "run_bench",
        }
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2_000)
    parser.add_argument("--candidates", type=int, default=500, help="per subject")
    parser.add_argument("--surface", default="home_feed")
    parser.add_argument("--reference-subjects", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    surface = load_settings().surface(args.surface)
    scored = synthetic_scored(args.subjects, args.candidates, args.seed)
    rss_before = peak_rss_mib()

    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        slates = build_slates(scored, surface, seed=args.seed)
        timings.append(time.perf_counter() - started)
    vectorized_s = min(timings)
    print(f"build_slates: {len(scored):,} rows in {vectorized_s:.3f}s (best of {args.repeats})")

    reference_ids = scored["subject_id"].unique()[: args.reference_subjects]
    sample = scored[scored["subject_id"].isin(reference_ids)]
    started = time.perf_counter()
    expected = reference_slates(sample, surface, seed=args.seed)
    reference_s = time.perf_counter() - started
    sampled = slates[slates["subject_id"].isin(reference_ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        sampled[COMPARED_COLUMNS],
        expected.astype(sampled[COMPARED_COLUMNS].dtypes.to_dict()),
        check_exact=False,
        rtol=1e-9,
    )
    print(f"reference loop: {len(reference_ids)} subjects in {reference_s:.3f}s, same slates")

    vectorized_per_subject = vectorized_s / args.subjects
    reference_per_subject = reference_s / len(reference_ids)
    summary = {
        "benchmark": "slates",
        "surface": args.surface,
        "subjects": args.subjects,
        "candidates_per_subject": args.candidates,
        "candidate_rows": len(scored),
        "slate_rows": len(slates),
        "build_slates_s": round(vectorized_s, 4),
        "candidate_rows_per_s": round(len(scored) / vectorized_s),
        "reference_subjects": len(reference_ids),
        "reference_s": round(reference_s, 4),
        "reference_projected_s": round(reference_per_subject * args.subjects, 2),
        "speedup_vs_reference": round(reference_per_subject / vectorized_per_subject, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_before_build_mib": round(rss_before, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
