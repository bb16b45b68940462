"""Benchmark: feature paths, side by side on the same rows, one JSON summary.

    python benchmarks/bench_features.py                # 5M probe rows × 5M build rows
    python benchmarks/bench_features.py --rows 500000  # a quicker run

1. Scoring a partition shard, the old way against the new, in the same run:
   - `row_path`: what features_asof + scored_candidates did before: `compute_features` (one
     DuckDB ASOF lookup per key, 53 columns per candidate row), the rows written as Parquet
     and read back, then the ranker over the DataFrame;
   - `entity_path`: what they do now: `feature_tables` (subject, item, subject × category /
     creator and exposure tables as of score_time) written as Parquet and read back, then
     `gather_features` (integer-coded lookups into one float32 matrix) and the ranker over
     the matrix (`RankerModel.predict_matrix`).
   The ranker is the product's network (64-32 MLP) with untrained weights: the same kernel.
   Target: entity path ≥ 5× faster (issue 13).
2. The ASOF join against a bare DuckDB ASOF JOIN, same row counts:

The probe is a scoring shard: `rows` candidate pairs (500 per subject) at one score_time.
The build side is `rows` exposures on this surface, drawn from the candidate pairs (so
about 63% of pairs have history), plus 30 interactions per subject (as `recsys seed`
generates) feeding the user, item and affinity lookups. The bare baseline is one
`ASOF LEFT JOIN` of the same probe against the same exposures, materialised to Arrow.
The pipeline figures come from `compute_features` itself (its `step_seconds`):
`asof_join` is every point-in-time lookup plus the join back to the probe rows;
`end_to_end` adds building the state tables and the pandas output.
Best of `--repeat` runs, interleaved. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import torch

from recsys_assets.models.ranker import RankerModel, _Network
from recsys_assets.pipeline.feature_tables import feature_tables, gather_features
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION, compute_features

CANDIDATES_PER_SUBJECT = 500
EVENTS_PER_SUBJECT = 30
ITEMS = 50_000
CATEGORIES = 40
CREATORS = 5_000
HISTORY_DAYS = 56
TARGET_RATIO = 0.5
SCORING_SPEEDUP_TARGET = 5.0
SCORE_TIME = pd.Timestamp("2024-03-01")


def _peak_rss_mib() -> float:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 1024 if sys.platform != "darwin" else peak_kib / 2**20


def _tables(rows: int, seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    subjects = max(1, rows // CANDIDATES_PER_SUBJECT)
    start = SCORE_TIME - pd.Timedelta(days=HISTORY_DAYS)

    def times(count: int) -> np.ndarray:
        offsets = rng.integers(0, HISTORY_DAYS * 86_400, count)
        return (start + pd.to_timedelta(offsets, unit="s")).to_numpy()

    pairs = pd.DataFrame(
        {
            "subject_id": np.repeat(np.arange(subjects, dtype=np.int64), CANDIDATES_PER_SUBJECT)[
                :rows
            ],
            "item_id": rng.integers(0, ITEMS, rows),
        }
    )
    shown = rng.integers(0, rows, rows)
    exposures = pd.DataFrame(
        {
            "user_id": pairs["subject_id"].to_numpy()[shown],
            "item_id": pairs["item_id"].to_numpy()[shown],
            "surface": "home_feed",
            "ts": times(rows),
        }
    )
    engaged = subjects * EVENTS_PER_SUBJECT
    interactions = pd.DataFrame(
        {
            "user_id": rng.integers(0, subjects, engaged),
            "item_id": rng.integers(0, ITEMS, engaged),
            "event_type": rng.choice(np.array(["view", "click", "purchase"]), engaged),
            "value": 1.0,
            "ts": times(engaged),
        }
    )
    item_ids = np.arange(ITEMS, dtype=np.int64)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "category": (item_ids % CATEGORIES).astype(str),
            "creator_id": (item_ids % CREATORS).astype(str),
            "stock": 10,
            "is_sponsored": False,
            "created_at": start - pd.Timedelta(days=30),
        }
    )
    return {"pairs": pairs, "exposures": exposures, "interactions": interactions, "items": items}


def _bare_asof(con: duckdb.DuckDBPyConnection, tables: dict[str, pd.DataFrame]) -> float:
    probe = tables["pairs"].assign(score_time=SCORE_TIME)
    con.register("bench_probe", probe)
    con.register("bench_build", tables["exposures"])
    started = time.perf_counter()
    con.sql(
        """
        SELECT p.subject_id, p.item_id, p.score_time, b.ts AS shown_at
        FROM bench_probe p
        ASOF LEFT JOIN bench_build b
            ON p.subject_id = b.user_id AND p.item_id = b.item_id AND p.score_time > b.ts
        """
    ).to_arrow_table()
    elapsed = time.perf_counter() - started
    con.unregister("bench_probe")
    con.unregister("bench_build")
    return elapsed


def _pipeline(
    con: duckdb.DuckDBPyConnection, tables: dict[str, pd.DataFrame]
) -> tuple[dict[str, float], float]:
    steps: dict[str, float] = {}
    started = time.perf_counter()
    compute_features(
        con,
        tables["pairs"],
        **_sources(tables),
        step_seconds=steps,
    )
    return steps, time.perf_counter() - started


def _sources(tables: dict[str, pd.DataFrame]) -> dict[str, object]:
    """The event tables, surface and score time every feature path reads."""
    return {
        "interactions": tables["interactions"],
        "exposures": tables["exposures"],
        "items": tables["items"],
        "surface": "home_feed",
        "score_time": SCORE_TIME,
    }


def _ranker() -> RankerModel:
    torch.manual_seed(0)
    network = _Network(len(FEATURE_COLUMNS), (64, 32))
    return RankerModel(network, hidden_sizes=(64, 32), device=torch.device("cpu"))


def _row_path(
    con: duckdb.DuckDBPyConnection,
    tables: dict[str, pd.DataFrame],
    ranker: RankerModel,
    folder: Path,
) -> tuple[float, np.ndarray]:
    """features_asof + scored_candidates before: feature rows, Parquet round trip, score."""
    started = time.perf_counter()
    rows = compute_features(
        con,
        tables["pairs"],
        **_sources(tables),
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    read = pd.read_parquet(
        folder / "rows.parquet", columns=[*FEATURE_COLUMNS, "feature_set_version"]
    )
    scores = ranker.predict(read)
    return time.perf_counter() - started, scores


def _entity_path(
    con: duckdb.DuckDBPyConnection,
    tables: dict[str, pd.DataFrame],
    ranker: RankerModel,
    folder: Path,
) -> tuple[float, np.ndarray]:
    """features_asof + scored_candidates now: entity tables, Parquet round trip, gather, score."""
    started = time.perf_counter()
    pairs = tables["pairs"]
    built = feature_tables(
        con,
        pairs["subject_id"].unique(),
        **_sources(tables),
    )
    for name, frame in built.tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    read = type(built)(
        score_time=built.score_time,
        tables={name: pd.read_parquet(folder / f"{name}.parquet") for name in built.tables},
    )
    gathered = gather_features(read, pairs)
    scores = ranker.predict_matrix(
        gathered.matrix, columns=tuple(FEATURE_COLUMNS), feature_set_version=FEATURE_SET_VERSION
    )
    return time.perf_counter() - started, scores


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="probe and build rows")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; best is kept")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    tables = _tables(args.rows, args.seed)
    con = duckdb.connect(":memory:", config={"threads": args.threads})
    torch.set_num_threads(args.threads)
    ranker = _ranker()
    row_s: list[float] = []
    entity_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_features_") as scratch:
        for attempt in range(args.repeat):
            seconds, old_scores = _row_path(con, tables, ranker, Path(scratch))
            row_s.append(seconds)
            seconds, new_scores = _entity_path(con, tables, ranker, Path(scratch))
            entity_s.append(seconds)
            if not np.array_equal(old_scores, new_scores):
                raise SystemExit("the entity path scored differently from the row path")
            print(
                f"scoring run {attempt + 1}/{args.repeat}: row path {row_s[-1]:.2f}s, "
                f"entity path {entity_s[-1]:.2f}s",
                flush=True,
            )
    bare_s: list[float] = []
    join_s: list[float] = []
    total_s: list[float] = []
    build_s: list[float] = []
    best_steps: dict[str, float] = {}
    for attempt in range(args.repeat):
        bare_s.append(_bare_asof(con, tables))
        steps, total = _pipeline(con, tables)
        if not join_s or steps["asof_join"] < min(join_s):
            best_steps = steps
        join_s.append(steps["asof_join"])
        build_s.append(steps["build_state"])
        total_s.append(total)
        print(
            f"run {attempt + 1}/{args.repeat}: bare {bare_s[-1]:.2f}s, "
            f"pipeline asof_join {join_s[-1]:.2f}s, build_state {build_s[-1]:.2f}s, "
            f"end-to-end {total:.2f}s",
            flush=True,
        )

    bare_rate = args.rows / min(bare_s)
    join_rate = args.rows / min(join_s)
    speedup = min(row_s) / min(entity_s)
    summary: dict[str, object] = {
        "benchmark": "features",
        "scoring": {
            "rows": args.rows,
            "row_path_s": round(min(row_s), 3),
            "entity_path_s": round(min(entity_s), 3),
            "speedup": round(speedup, 2),
            "target_speedup": SCORING_SPEEDUP_TARGET,
            "meets_target": speedup >= SCORING_SPEEDUP_TARGET,
            "identical_scores": True,
        },
        "probe_rows": args.rows,
        "build_rows": args.rows,
        "interaction_rows": max(1, args.rows // CANDIDATES_PER_SUBJECT) * EVENTS_PER_SUBJECT,
        "threads": args.threads,
        "bare_asof_rows_per_s": round(bare_rate),
        "pipeline_asof_join_rows_per_s": round(join_rate),
        "pipeline_end_to_end_rows_per_s": round(args.rows / min(total_s)),
        "pipeline_build_state_s": round(min(build_s), 3),
        "pipeline_steps_s": {step: round(seconds, 3) for step, seconds in best_steps.items()},
        "ratio_vs_bare": round(join_rate / bare_rate, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": join_rate / bare_rate >= TARGET_RATIO,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
