"""Benchmark: the candidate stage of one partition, this checkout vs a git revision, side by side.

    python benchmarks/bench_candidates.py [--baseline-rev REV] [--subjects N] [--rounds R]
                                          [--workdir DIR]

Uses the medium warehouse and bundle that `benchmarks/bench_pipeline.py` keeps under its
workdir (seeded and trained there when missing). For `pipeline/candidates.py` of this checkout
and of `--baseline-rev` (loaded from git, default HEAD), it times, alternating within one run:

- `build_context`, the partition's candidate ingredients (item neighbours, trending, ...);
- `generate_candidates` for the first `--subjects` subjects of home_feed × na (one shard).

It checks both versions propose the same (subject, item) pairs with the same provenance and
ranks, and reports the largest difference of each float column. Best of `--rounds`, ratios
baseline / this checkout; the last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import (
    DEFAULT_WORKDIR,
    ensure_bundle,
    ensure_seeded,
    seed_scales,
)

MODULE = "recsys_assets/pipeline/candidates.py"


def load_revision(revision: str, folder: Path) -> ModuleType:
    """`pipeline/candidates.py` as of `revision`, imported under its own module name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{revision}:{MODULE}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "baseline_candidates.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_candidates", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_candidates"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _comparable(column: pd.Series) -> pd.Series:
    """Text as plain strings, whether a revision keeps it coded (pipeline/text.py) or not."""
    if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype.kind == "O":
        return column.astype(str)
    return column


def compare(baseline: pd.DataFrame, current: pd.DataFrame) -> dict[str, Any]:
    """Same pairs, provenance and ranks; the largest absolute difference per float column."""
    baseline, current = baseline.reset_index(drop=True), current.reset_index(drop=True)
    keys = ["subject_id", "item_id"]
    same_pairs = baseline[keys].equals(current[keys])
    found: dict[str, Any] = {"same_pairs": same_pairs, "rows": len(current)}
    if not same_pairs:
        return found
    exact = [c for c in baseline.columns if c not in keys and baseline[c].dtype.kind != "f"]
    found["same_provenance_and_ranks"] = all(
        _comparable(baseline[c]).equals(_comparable(current[c])) for c in exact
    )
    found["max_abs_difference"] = {
        column: float(
            np.nanmax(np.abs(baseline[column].to_numpy() - current[column].to_numpy()), initial=0)
        )
        for column in baseline.columns
        if baseline[column].dtype.kind == "f"
    }
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="HEAD")
    parser.add_argument("--subjects", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)

    from recsys_assets.config import load_settings
    from recsys_assets.data import read_raw
    from recsys_assets.models.bundle import load_bundle
    from recsys_assets.pipeline import candidates as current_module
    from recsys_assets.pipeline.retrieval import two_tower_retriever
    from recsys_assets.pipeline.subjects import select_subjects
    from recsys_assets.rules.person import read_events
    from recsys_assets.rules.tombstones import load_tombstones
    from recsys_assets.warehouse import Warehouse

    scale = seed_scales("medium", with_double=False)[0]
    folder = args.workdir / scale.name
    ensure_seeded(folder, scale, seed=7, fresh=False)
    ensure_bundle(folder, fresh=False)
    warehouse = Warehouse(str(folder))
    settings = load_settings()
    surface = settings.surface("home_feed")
    bundle = load_bundle(warehouse)
    tables = {
        table: read_raw(warehouse, table)
        for table in ("items", "interactions", "user_controls", "editorial", "users")
    }
    score_time = pd.Timestamp(tables["interactions"]["ts"].max()) + pd.Timedelta(minutes=1)
    subjects = (
        select_subjects(tables["users"], surface, region="na", now=score_time)
        .subjects.sort_values("subject_id")
        .head(args.subjects)
    )
    retriever = two_tower_retriever(
        bundle.two_tower, item_chunk=settings.pipeline.retrieval_item_chunk
    )

    def run(module: ModuleType) -> tuple[float, float, pd.DataFrame]:
        started = time.perf_counter()
        context = module.build_context(
            items=tables["items"],
            interactions=tables["interactions"],
            user_controls=tables["user_controls"],
            editorial=tables["editorial"],
            region="na",
            surface=surface,
            score_time=score_time,
            trending_window_days=settings.pipeline.trending_window_days,
            trending_min_share=settings.pipeline.trending_min_share,
            recent_history_items=settings.pipeline.recent_history_items,
            collaborative=bundle.collaborative,
            tombstones=load_tombstones(warehouse),
            events=read_events(warehouse),
        )
        built = time.perf_counter()
        pool = module.generate_candidates(
            subjects,
            context,
            surface,
            two_tower=retriever,
            recent_items_per_user=settings.pipeline.recent_items_per_user,
        )
        return built - started, time.perf_counter() - built, pool

    with tempfile.TemporaryDirectory() as scratch:
        baseline_module = load_revision(args.baseline_rev, Path(scratch))
        times: dict[str, dict[str, list[float]]] = {
            name: {"context_s": [], "shard_s": []} for name in ("baseline", "current")
        }
        pools: dict[str, pd.DataFrame] = {}
        for _ in range(args.rounds):
            for name, module in (("baseline", baseline_module), ("current", current_module)):
                context_s, shard_s, pools[name] = run(module)
                times[name]["context_s"].append(context_s)
                times[name]["shard_s"].append(shard_s)
    best = {
        name: {step: min(values) for step, values in found.items()} for name, found in times.items()
    }
    summary = {
        "benchmark": "candidates",
        "baseline_rev": args.baseline_rev,
        "subjects": len(subjects),
        "best_s": best,
        "speedup": {
            step: round(best["baseline"][step] / best["current"][step], 3)
            for step in ("context_s", "shard_s")
        },
        "shard_rows_per_s": round(len(pools["current"]) / best["current"]["shard_s"]),
        "agreement": compare(pools["baseline"], pools["current"]),
    }
    for name, found in best.items():
        print(f"{name:9s} context {found['context_s']:6.2f}s   shard {found['shard_s']:6.2f}s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
