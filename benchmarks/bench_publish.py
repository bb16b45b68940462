"""Publish benchmark: peak RSS of publishing one partition at a scale and at 2× its users.

    python benchmarks/bench_publish.py [--scale medium] [--surface home_feed] [--region na]
                                       [--skip-2x] [--fresh] [--workdir DIR]

Seeds a warehouse at `--scale` and one with twice its users (bench_pipeline's scales and
seeding, reused when the snapshot matches), writes the partition's `subjects` and `slates`
parts the way the pipeline does (subject shards of `pipeline.shard_subjects`; slates built by
`build_slates` from synthetic scored candidates over the region's eligible items, so the
version passes the gate and is flipped), then runs `publish_partition` in a fresh subprocess
per warehouse, waited for with `wait4` as bench_pipeline does, and takes the child's own peak
RSS (`own_peak_rss_mib`). Reported side by side: rows and lists published, wall time, peak
RSS, and the 2× / 1× ratio (target <= 1.3).

The slates stand in for the pipeline's (no model training or partition run needed); the
warehouses are kept under `--workdir` (gitignored) and reused, `--fresh` rebuilds them.
`bench_serving.py` serves the versions published here in its RSS runs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_pipeline import (
    AS_OF,
    RSS_RATIO_TARGET,
    _table,
    ensure_seeded,
    run_script_child,
    seed_scales,
)

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "output" / "bench_publish"
SEED = 7
SCORE_TIME = pd.Timestamp(AS_OF)
PUBLISH_AT = SCORE_TIME + pd.Timedelta(minutes=10)
"""The publish clock: ten minutes after scoring, so the freshness gate passes."""
CANDIDATES_PER_SUBJECT = 250
SOURCE_MIXES = np.array(
    ["two_tower", "collaborative|two_tower", "item_to_item", "content|trending", "trending"]
)
_PREPARED = "bench_partition.json"
"""Marker in the warehouse: which partition's subjects and slates were written, and how."""


def own_peak_rss_mib() -> float | None:
    """This process's own peak RSS (`VmHWM`, Linux; None elsewhere).

    wait4's ru_maxrss of a child also counts its parent's peak: Python spawns with vfork +
    exec, and exec carries the parent's high-water mark into the child's. A benchmark
    parent that seeded a warehouse or ran other measurements first would put a floor under
    every child's number, so each child reports its own and wait4's is the fallback.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


# -- the partition's upstream tables -------------------------------------------------------


def _scored_shard(
    subject_ids: np.ndarray, pool: pd.DataFrame, rng: np.random.Generator
) -> pd.DataFrame:
    """Scored candidates shaped like the pipeline's, drawn from the eligible `pool`."""
    size = len(subject_ids) * CANDIDATES_PER_SUBJECT
    picked = pool.iloc[rng.integers(0, len(pool), size)]
    return pd.DataFrame(
        {
            "subject_id": np.repeat(subject_ids, CANDIDATES_PER_SUBJECT),
            "item_id": picked["item_id"].to_numpy(dtype=np.int64),
            "utility": rng.beta(2, 8, size),
            "calibrated": rng.beta(2, 8, size),
            "item_type": picked["item_type"].to_numpy(),
            "category": picked["category"].to_numpy(),
            "creator_id": picked["creator_id"].to_numpy(),
            "is_sponsored": picked["is_sponsored"].to_numpy(dtype=bool),
            "is_exploration_candidate": rng.random(size) < 0.1,
            "source_provenance": SOURCE_MIXES[rng.integers(0, len(SOURCE_MIXES), size)],
            "model_version": "model_bench",
            "feature_set_version": "features_bench",
            "utility_policy_version": "utility_v1",
            "score_time": SCORE_TIME,
            "pipeline_run_id": "bench_publish",
            "candidate_policy_version": "candidates_bench",
        }
    )


def prepare_partition(
    folder: Path, scale: Any, surface_name: str, region: str, fresh: bool
) -> dict[str, Any]:
    """Seed `folder` (unless reused) and write the partition's subjects and slates parts."""
    from recsys_assets.config import load_settings
    from recsys_assets.data import read_raw
    from recsys_assets.pipeline.shards import part_name, stage_path
    from recsys_assets.pipeline.slates import build_slates
    from recsys_assets.pipeline.subjects import select_subjects, shard_bounds
    from recsys_assets.rules.eligibility import item_rejection_reasons
    from recsys_assets.warehouse import Warehouse, partition_path

    seeded = ensure_seeded(folder, scale, SEED, fresh)
    warehouse = Warehouse(str(folder))
    wanted = {"surface": surface_name, "region": region, "scale": scale.name, "seed": SEED}
    marker = folder / _PREPARED
    if seeded["reused"] and marker.exists() and json.loads(marker.read_text()) == wanted:
        return {**seeded, "slates_reused": True}
    settings = load_settings()
    surface = settings.surface(surface_name)
    where = partition_path(surface=surface_name, region=region)
    subjects = select_subjects(
        read_raw(warehouse, "users"), surface, region=region, now=SCORE_TIME
    ).subjects
    items = read_raw(warehouse, "items")
    eligible = item_rejection_reasons(
        items, region=region, now=SCORE_TIME, subject_tenant=pd.Series([None] * len(items))
    ).isna()
    pool = items.loc[eligible.to_numpy()].reset_index(drop=True)
    rng = np.random.default_rng(SEED)
    subject_parts: dict[str, pd.DataFrame] = {}
    slate_parts: dict[str, pd.DataFrame] = {}
    bounds = shard_bounds(len(subjects), settings.pipeline.shard_subjects)
    for index, (start, stop) in enumerate(bounds):
        shard = subjects.iloc[start:stop]
        scored = _scored_shard(shard["subject_id"].to_numpy(dtype=np.int64), pool, rng)
        subject_parts[part_name(index)] = shard
        slate_parts[part_name(index)] = build_slates(scored, surface, seed=SEED)
    warehouse.replace_folder(stage_path("subjects", where), subject_parts)
    warehouse.replace_folder(stage_path("slates", where), slate_parts)
    marker.write_text(json.dumps(wanted))
    return {**seeded, "slates_reused": False}


# -- the measured child ------------------------------------------------------------------


def publish_child(warehouse_url: str, surface: str, region: str) -> dict[str, Any]:
    """Publish the partition once (what the `published_lists` asset runs)."""
    from recsys_assets.config import load_settings
    from recsys_assets.publish import publisher
    from recsys_assets.warehouse import Warehouse

    started = time.perf_counter()
    outcome = publisher.publish_partition(
        Warehouse(warehouse_url),
        load_settings(),
        surface,
        region,
        now=PUBLISH_AT.to_pydatetime(),
        pipeline_run_id="bench_publish",
    )
    return {
        "wall_s": time.perf_counter() - started,
        "published": outcome.published,
        "version": outcome.version,
        "rows": outcome.report.metrics.get("rows"),
        "lists": outcome.report.metrics.get("lists"),
        "failures": outcome.failures,
        "own_peak_rss_mib": own_peak_rss_mib(),
    }


def publish_once(folder: Path, surface: str, region: str) -> dict[str, Any]:
    """Publish in a child process; its result with wall time and peak RSS."""
    found, wall, rss = run_script_child(
        Path(__file__).resolve(),
        ["--child", "--warehouse", str(folder), "--surface", surface, "--region", region],
        folder.parent / f"{folder.name}_publish.json",
    )
    if not found["published"]:
        raise SystemExit(f"{folder.name}: the version was refused: {found['failures']}")
    return {**found, "peak_rss_mib": rss, "process_s": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="medium")
    parser.add_argument("--surface", default="home_feed")
    parser.add_argument("--region", default="na")
    parser.add_argument("--skip-2x", action="store_true", help="no 2× users run (no RSS ratio)")
    parser.add_argument("--fresh", action="store_true", help="re-seed and rewrite the slates")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warehouse", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        found = publish_child(args.warehouse, args.surface, args.region)
        args.out.write_text(json.dumps(found))
        return found

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    for scale in seed_scales(args.scale, with_double=not args.skip_2x):
        folder = workdir / scale.name
        started = time.perf_counter()
        prepared = prepare_partition(folder, scale, args.surface, args.region, args.fresh)
        how = "reused" if prepared["slates_reused"] else "prepared"
        print(f"{scale.name}: {scale.users} users, {how} in {time.perf_counter() - started:.0f}s")
        runs[scale.name] = publish_once(folder, args.surface, args.region)
        run = runs[scale.name]
        print(
            f"{scale.name}: published {run['rows']:,} rows ({run['lists']:,} lists) in "
            f"{run['wall_s']:.1f}s, peak RSS {run['peak_rss_mib']:.0f} MiB",
            flush=True,
        )

    names = list(runs)
    ratio = (
        runs[names[-1]]["peak_rss_mib"] / runs[names[0]]["peak_rss_mib"] if len(runs) > 1 else None
    )
    ratio_cells = [""] * (len(names) - 1) + ["skipped" if ratio is None else f"{ratio:.3f}"]
    print()
    print(
        _table(
            [
                ("measure", *names, "target"),
                ("list rows", *(f"{run['rows']:,}" for run in runs.values()), ""),
                ("lists", *(f"{run['lists']:,}" for run in runs.values()), ""),
                ("publish_partition (s)", *(f"{run['wall_s']:.1f}" for run in runs.values()), ""),
                ("peak RSS (MiB)", *(f"{run['peak_rss_mib']:,.0f}" for run in runs.values()), ""),
                ("peak RSS 2x / 1x", *ratio_cells, f"<= {RSS_RATIO_TARGET}"),
            ]
        )
    )
    summary: dict[str, Any] = {
        "benchmark": "publish_partition",
        "scale": args.scale,
        "partition": f"{args.surface}|{args.region}",
        "rows": {name: run["rows"] for name, run in runs.items()},
        "lists": {name: run["lists"] for name, run in runs.items()},
        "publish_s": {name: round(run["wall_s"], 2) for name, run in runs.items()},
        "peak_rss_mib": {name: round(run["peak_rss_mib"], 1) for name, run in runs.items()},
        "rss_ratio_2x": None if ratio is None else round(ratio, 3),
        "rss_ratio_target": RSS_RATIO_TARGET,
        "meets_rss_target": None if ratio is None else ratio <= RSS_RATIO_TARGET,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
