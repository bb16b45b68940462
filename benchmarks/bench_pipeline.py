"""Benchmark: the batch pipeline's four targets, measured in one run, one JSON summary.

    python benchmarks/bench_pipeline.py [--scale medium] [--surface home_feed] [--region na]
                                        [--skip-2x] [--skip-components] [--fresh]
                                        [--workdir DIR] [--baseline-rev REV [--rounds R]]

Seeds a warehouse at `--scale` (and one with twice its users), trains the model bundle once
(the doubled warehouse gets a copy of it: same model, more users), then materializes the
partition's chain with `dagster.materialize` in a fresh subprocess per warehouse, with a
pinned score_time, and reads the child's peak RSS (`ru_maxrss` from `wait4`). Reported
side by side:

- scored candidate rows per second of the partition run (scored rows / wall time of the
  whole materialization) vs the ranker kernel alone: the same bundle's network over the
  same number of rows × FEATURE_COLUMNS, torch only, in its own subprocess (target >= 0.25,
  moonshot 0.5);
- peak RSS of the partition run at the scale and at 2× its users (target ratio <= 1.3);
- seconds per asset step, from the run's step events, and the scored_candidates step's own
  rate (read features, score, utility, contract check, write) next to the kernel's;
- the materialization floor: every part of candidate_pools, scored_candidates and slates
  the run wrote, read back, validated and written again with nothing computed (what
  materializing and checking these tables costs by itself), and the pipeline / kernel
  ratio a graph that does only that would reach;
- unless `--skip-components`: exact retrieval vs faiss IndexFlatIP (benchmarks/
  bench_retrieval.py: 100k items, d=64, k=500, 2 threads; target >= 0.95) and the feature
  ASOF join vs a bare DuckDB ASOF JOIN (benchmarks/bench_features.py: 5M × 5M; target
  >= 0.5), each in its own subprocess, their JSON summaries nested in this one;
- with `--baseline-rev REV`: the partition run of REV's code (`git archive`, its own child
  on PYTHONPATH) and of this checkout, alternating `--rounds` times on the same warehouse,
  best of each, per-step speed-ups: the side-by-side ratio a noisy machine still allows.

Seeded warehouses and the bundle are kept under `--workdir` (gitignored) and reused when
their snapshot matches scale, seed and as_of; `--fresh` re-seeds. The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

PARTITION_ASSETS = ("subjects", "candidate_pools", "features_asof", "scored_candidates", "slates")
AS_OF = datetime(2026, 1, 15)
"""Fixed snapshot time: the same seed gives the same data on every run."""
THROUGHPUT_TARGET = 0.25
"""Issue 13: pipeline rows/s >= 0.25× the ranker kernel (moonshot 0.5×)."""
RSS_RATIO_TARGET = 1.3
RETRIEVAL_TARGET = 0.95
"""Issue 13: retrieval >= 0.95× bare faiss in the same run (the wrapper costs <= 5%)."""
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "output" / "bench_pipeline"
BENCH_TRAINING = {"epochs": 1}
"""One epoch keeps training short: the benchmark times scoring, not training."""
KERNEL_BATCH = 65_536
"""RankerModel.predict's batch size: the kernel runs the same batches."""


# -- warehouses --------------------------------------------------------------------------


def seed_scales(scale_name: str, with_double: bool) -> list[Any]:
    """The SeedScale to benchmark and, unless skipped, the same scale with twice the users."""
    from recsys_assets.data.seed import SCALES

    if scale_name not in SCALES:
        raise SystemExit(f"--scale {scale_name!r}: choose one of {list(SCALES)}")
    base = SCALES[scale_name]
    scales = [base]
    if with_double:
        scales.append(dataclasses.replace(base, name=f"{base.name}_2x", users=2 * base.users))
    return scales


def ensure_seeded(folder: Path, scale: Any, seed: int, fresh: bool) -> dict[str, Any]:
    """Seed `folder` unless it already holds this (scale, seed, AS_OF) snapshot."""
    from recsys_assets.config import load_settings
    from recsys_assets.data import read_snapshot
    from recsys_assets.data.seed import seed_warehouse
    from recsys_assets.warehouse import Warehouse

    warehouse = Warehouse(str(folder))
    if not fresh:
        try:
            snapshot = read_snapshot(warehouse)
        except FileNotFoundError:
            snapshot = {}
        wanted = {"scale": scale.name, "seed": seed, "as_of": AS_OF.isoformat()}
        if all(snapshot.get(key) == value for key, value in wanted.items()):
            return {"reused": True, "seconds": 0.0, "row_counts": snapshot["row_counts"]}
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    report = seed_warehouse(
        Warehouse(str(folder)), scale=scale, seed=seed, settings=load_settings(), as_of=AS_OF
    )
    return {
        "reused": False,
        "seconds": time.perf_counter() - started,
        "row_counts": report.row_counts,
    }


def ensure_bundle(folder: Path, fresh: bool) -> dict[str, Any]:
    """Train the bundle on `folder` unless one is already there (and not --fresh)."""
    from recsys_assets.config import load_settings
    from recsys_assets.models.bundle import current_model_version, train_bundle
    from recsys_assets.warehouse import Warehouse

    warehouse = Warehouse(str(folder))
    version = current_model_version(warehouse)
    if version is not None and not fresh:
        return {"reused": True, "seconds": 0.0, "model_version": version}
    settings = load_settings()
    training = settings.training.model_copy(update=BENCH_TRAINING)
    started = time.perf_counter()
    info = train_bundle(warehouse, settings.model_copy(update={"training": training}))
    return {
        "reused": False,
        "seconds": time.perf_counter() - started,
        "model_version": info.model_version,
    }


def copy_bundle(source: Path, target: Path) -> None:
    """Give `target` the same model bundle as `source` (models/ folder, current.json last)."""
    shutil.rmtree(target / "models", ignore_errors=True)
    shutil.copytree(source / "models", target / "models")


# -- children ----------------------------------------------------------------------------


def run_child(arguments: list[str], result_file: Path) -> tuple[dict[str, Any], float, float]:
    """Run this script as a child; (its JSON result, wall seconds, its peak RSS in MiB)."""
    return run_script_child(Path(__file__).resolve(), arguments, result_file)


def run_script_child(
    script: Path,
    arguments: list[str],
    result_file: Path,
    env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], float, float]:
    """Run `script` with `arguments --out result_file`; (its JSON, wall s, peak RSS MiB).

    The peak is the child's own (`own_peak_rss_mib` in its JSON) where it reports one, else
    wait4's ru_maxrss (which can include the parent's peak carried over by the fork).
    """
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(script), *arguments, "--out", str(result_file)]
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    assert child.stderr is not None
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0 or not result_file.exists():
        raise SystemExit(f"child {arguments[:2]} failed ({child.returncode}):\n{stderr[-4000:]}")
    found = json.loads(result_file.read_text())
    return found, wall, found.get("own_peak_rss_mib") or _rss_mib(usage.ru_maxrss)


def _rss_mib(ru_maxrss: int) -> float:
    return ru_maxrss / 2**20 if sys.platform == "darwin" else ru_maxrss / 1024


def partition_child(warehouse: str, surface: str, region: str, score_time: str) -> dict[str, Any]:
    """Materialize the partition's chain on an ephemeral instance; timings and row counts."""
    import dagster as dg
    from dagster_duckdb import DuckDBResource

    from recsys_assets.pipeline.assets import PIPELINE_ASSETS
    from recsys_assets.pipeline.metadata import ROW_COUNT
    from recsys_assets.pipeline.partitions import SurfaceRegion
    from recsys_assets.pipeline.resources import RecsysResource

    resources = {
        "recsys": RecsysResource(warehouse_url=warehouse, score_time=score_time),
        "duckdb": DuckDBResource(database=":memory:"),
    }
    started = time.perf_counter()
    result = dg.materialize(
        PIPELINE_ASSETS,
        selection=list(PARTITION_ASSETS),
        partition_key=SurfaceRegion(surface, region).to_key(),
        resources=resources,
        raise_on_error=False,
    )
    wall = time.perf_counter() - started
    if not result.success:
        failures = [
            f"{event.step_key}: {event.step_failure_data.error.message.strip()}"  # type: ignore[union-attr]
            for event in result.all_events
            if event.is_step_failure and event.step_failure_data and event.step_failure_data.error
        ]
        raise SystemExit(f"partition run failed: {failures or 'a blocking check failed'}")
    rows: dict[str, int] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        rows[materialization.asset_key.to_user_string()] = int(
            materialization.metadata[ROW_COUNT].value  # type: ignore[arg-type]
        )
    return {"wall_s": wall, "rows": rows, "steps_s": _step_seconds(result)}


def _step_seconds(result: Any) -> dict[str, float]:
    """Seconds of each asset's steps, from their STEP_SUCCESS events: a sharded asset's
    steps (`scored_candidates.scored_candidates_shard[shard_00000]`, …, its fan-out and
    merge) add up under the asset's name."""
    seconds: dict[str, float] = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS" and event.step_key is not None:
            asset = event.step_key.split(".", 1)[0]
            duration = event.event_specific_data.duration_ms / 1000  # type: ignore[union-attr]
            seconds[asset] = seconds.get(asset, 0.0) + duration
    return seconds


def kernel_child(warehouse: str, rows: int, repeats: int) -> dict[str, Any]:
    """The bundle's ranker network over `rows` × FEATURE_COLUMNS float32, torch only."""
    import torch

    from recsys_assets.models.bundle import load_bundle
    from recsys_assets.warehouse import Warehouse

    ranker = load_bundle(Warehouse(warehouse)).ranker
    generator = np.random.default_rng(0)
    matrix = generator.gamma(1.0, 3.0, (rows, len(ranker.feature_columns))).astype(np.float32)
    out = np.empty(rows, dtype=np.float32)

    def one_pass() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, rows, KERNEL_BATCH):
                batch = torch.from_numpy(matrix[start : start + KERNEL_BATCH]).to(ranker.device)
                out[start : start + KERNEL_BATCH] = (
                    torch.sigmoid(ranker.network(batch)).float().cpu().numpy()
                )
        return time.perf_counter() - started

    one_pass()
    best = min(one_pass() for _ in range(repeats))
    return {
        "rows": rows,
        "best_s": best,
        "rows_per_s": rows / best,
        "device": str(ranker.device),
        "torch_threads": torch.get_num_threads(),
    }


FLOOR_STAGES = ("candidate_pools", "scored_candidates", "slates")
"""The tables with a row per candidate (slates: per slate row) that the graph materializes."""


def floor_child(warehouse: str, surface: str, region: str) -> dict[str, Any]:
    """What materializing the per-candidate tables costs by itself: every part the partition
    run just wrote is read back, validated by its contract and written again (to a scratch
    folder), with nothing computed. A graph that writes these tables, checks them and reads
    them downstream cannot run faster than this, however fast its computation."""
    import tempfile

    from recsys_assets.contracts.pipeline import validate_stage
    from recsys_assets.pipeline.partitions import SurfaceRegion
    from recsys_assets.pipeline.shards import stage_path
    from recsys_assets.warehouse import Warehouse

    store = Warehouse(warehouse)
    partition = SurfaceRegion(surface, region).path
    seconds: dict[str, dict[str, float]] = {}
    rows: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as scratch_folder:
        scratch = Warehouse(scratch_folder)
        for stage in FLOOR_STAGES:
            spent = {"read": 0.0, "validate": 0.0, "write": 0.0}
            rows[stage] = 0
            for part in store.list(stage_path(stage, partition), suffix=".parquet"):
                started = time.perf_counter()
                frame = store.read_parquet(part)
                read = time.perf_counter()
                validate_stage(stage, frame)
                validated = time.perf_counter()
                scratch.write_parquet(part, frame)
                spent["read"] += read - started
                spent["validate"] += validated - read
                spent["write"] += time.perf_counter() - validated
                rows[stage] += len(frame)
            seconds[stage] = spent
    return {
        "seconds": seconds,
        "rows": rows,
        "total_s": sum(sum(spent.values()) for spent in seconds.values()),
    }


def run_components() -> dict[str, dict[str, Any]]:
    """Retrieval vs faiss and features vs bare DuckDB, each its own script in a subprocess
    (own threads and peak RSS); the ratio and the rates each compared, plus its summary."""
    here = Path(__file__).resolve().parent
    found: dict[str, dict[str, Any]] = {}
    for name, script in (("retrieval", "bench_retrieval.py"), ("features", "bench_features.py")):
        print(f"{name}: running benchmarks/{script}", flush=True)
        child = subprocess.run(
            [sys.executable, str(here / script)], capture_output=True, text=True, check=False
        )
        lines = child.stdout.strip().splitlines()
        if child.returncode != 0 or not lines:
            raise SystemExit(f"{script} failed ({child.returncode}):\n{child.stderr[-4000:]}")
        summary = json.loads(lines[-1])
        if name == "retrieval":
            rates = summary["users_per_s"]
            found[name] = {
                "ours": rates["exact_top_k"],
                "baseline": rates["faiss_flat_ip"],
                "baseline_name": "faiss IndexFlatIP",
                "unit": "users/s",
                "ratio": summary["ratio_vs_faiss"],
                "target": RETRIEVAL_TARGET,
                "summary": summary,
            }
        else:
            found[name] = {
                "ours": summary["pipeline_asof_join_rows_per_s"],
                "baseline": summary["bare_asof_rows_per_s"],
                "baseline_name": "bare DuckDB ASOF JOIN",
                "unit": "probe rows/s",
                "ratio": summary["ratio_vs_bare"],
                "target": summary["target_ratio"],
                "summary": summary,
            }
    return found


# -- report ------------------------------------------------------------------------------


def _how(step: dict[str, Any], verb: str) -> str:
    return "reused" if step["reused"] else f"{verb} in {step['seconds']:.0f}s"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def export_revision(revision: str, folder: Path) -> Path:
    """The repository's files at `revision` (`git archive`), unpacked into `folder`."""
    root = Path(__file__).resolve().parents[1]
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", revision],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def side_by_side(
    revision: str, rounds: int, partition_arguments: list[str], workdir: Path
) -> dict[str, Any]:
    """The partition run of `revision`'s code and of this checkout, alternating `rounds`
    times on the same warehouse; best wall and step seconds of each, and the speed-ups.

    The revision's own bench_pipeline.py child runs with its tree first on PYTHONPATH, so
    its `recsys_assets` (and configuration) is imported instead of this checkout's.
    """
    baseline_root = export_revision(revision, workdir / "baseline_tree")
    environment = {**os.environ, "PYTHONPATH": str(baseline_root)}
    versions = {
        "baseline": (baseline_root / "benchmarks" / "bench_pipeline.py", environment),
        "current": (Path(__file__).resolve(), None),
    }
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
    for round_index in range(rounds):
        for name, (script, env) in versions.items():
            result, _, rss = run_script_child(
                script, partition_arguments, workdir / f"side_by_side_{name}.json", env
            )
            found[name].append({**result, "peak_rss_mib": rss})
            print(
                f"round {round_index + 1} {name}: partition run {result['wall_s']:.1f}s, "
                f"peak RSS {rss:.0f} MiB",
                flush=True,
            )
    shutil.rmtree(baseline_root)
    best = {
        name: {
            "wall_s": min(run["wall_s"] for run in runs),
            "peak_rss_mib": min(run["peak_rss_mib"] for run in runs),
            "steps_s": {
                step: min(run["steps_s"].get(step, 0.0) for run in runs)
                for step in PARTITION_ASSETS
            },
            "rows": runs[0]["rows"],
        }
        for name, runs in found.items()
    }
    speedup = {
        "partition": best["baseline"]["wall_s"] / best["current"]["wall_s"],
        **{
            step: best["baseline"]["steps_s"][step] / max(best["current"]["steps_s"][step], 1e-9)
            for step in PARTITION_ASSETS
        },
    }
    print()
    print(
        _table(
            [
                ("step (best of rounds)", f"baseline {revision}", "this checkout", "speed-up"),
                *(
                    (
                        step,
                        f"{best['baseline']['steps_s'][step]:.1f}s",
                        f"{best['current']['steps_s'][step]:.1f}s",
                        f"{speedup[step]:.2f}x",
                    )
                    for step in PARTITION_ASSETS
                ),
                (
                    "partition run",
                    f"{best['baseline']['wall_s']:.1f}s",
                    f"{best['current']['wall_s']:.1f}s",
                    f"{speedup['partition']:.2f}x",
                ),
                (
                    "peak RSS (MiB)",
                    f"{best['baseline']['peak_rss_mib']:,.0f}",
                    f"{best['current']['peak_rss_mib']:,.0f}",
                    "",
                ),
            ]
        )
    )
    return {
        "baseline_rev": revision,
        "rounds": rounds,
        "best": best,
        "speedup": {name: round(value, 3) for name, value in speedup.items()},
        "same_rows": best["baseline"]["rows"] == best["current"]["rows"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="medium")
    parser.add_argument("--surface", default="home_feed")
    parser.add_argument("--region", default="na")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-2x", action="store_true", help="no 2× users run (no RSS ratio)")
    parser.add_argument(
        "--skip-components",
        action="store_true",
        help="skip the retrieval vs faiss and features vs bare ASOF JOIN benchmarks",
    )
    parser.add_argument("--fresh", action="store_true", help="re-seed and retrain")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--kernel-repeats", type=int, default=3)
    parser.add_argument(
        "--baseline-rev",
        help="also run the partition with the code of this git revision, alternating with "
        "this checkout's (--rounds times), and report the speed-up per step",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --baseline-rev")
    parser.add_argument("--child", choices=("partition", "kernel", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--warehouse", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--score-time", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "partition":
        found = partition_child(args.warehouse, args.surface, args.region, args.score_time)
        args.out.write_text(json.dumps(found))
        return found
    if args.child == "kernel":
        found = kernel_child(args.warehouse, args.rows, args.kernel_repeats)
        args.out.write_text(json.dumps(found))
        return found
    if args.child == "floor":
        found = floor_child(args.warehouse, args.surface, args.region)
        args.out.write_text(json.dumps(found))
        return found

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scales = seed_scales(args.scale, with_double=not args.skip_2x)
    score_time = AS_OF.isoformat()
    runs: dict[str, dict[str, Any]] = {}
    bundle: dict[str, Any] = {}

    def partition_arguments(folder: Path) -> list[str]:
        return [
            "--child",
            "partition",
            "--warehouse",
            str(folder),
            "--surface",
            args.surface,
            "--region",
            args.region,
            "--score-time",
            score_time,
        ]

    for index, scale in enumerate(scales):
        folder = workdir / scale.name
        seeded = ensure_seeded(folder, scale, args.seed, args.fresh)
        print(
            f"{scale.name}: {scale.users} users, {_how(seeded, 'seeded')}",
            flush=True,
        )
        if index == 0:
            bundle = ensure_bundle(folder, args.fresh)
            print(
                f"model bundle {bundle['model_version']}: {_how(bundle, 'trained')}",
                flush=True,
            )
        else:
            copy_bundle(workdir / scales[0].name, folder)
        found, wall, rss = run_child(
            partition_arguments(folder), workdir / f"{scale.name}_partition.json"
        )
        runs[scale.name] = {**found, "peak_rss_mib": rss, "process_s": wall}
        print(
            f"{scale.name}: partition run {found['wall_s']:.1f}s, "
            f"{found['rows'].get('scored_candidates', 0):,} scored rows, peak RSS {rss:.0f} MiB",
            flush=True,
        )

    base = runs[scales[0].name]
    scored_rows = base["rows"]["scored_candidates"]
    kernel, _, _ = run_child(
        [
            "--child",
            "kernel",
            "--warehouse",
            str(workdir / scales[0].name),
            "--rows",
            str(max(scored_rows, 1)),
            "--kernel-repeats",
            str(args.kernel_repeats),
        ],
        workdir / "kernel.json",
    )
    floor, _, _ = run_child(
        [
            "--child",
            "floor",
            "--warehouse",
            str(workdir / scales[0].name),
            "--surface",
            args.surface,
            "--region",
            args.region,
        ],
        workdir / "floor.json",
    )
    components = {} if args.skip_components else run_components()
    compared = (
        side_by_side(
            args.baseline_rev,
            args.rounds,
            partition_arguments(workdir / scales[0].name),
            workdir,
        )
        if args.baseline_rev
        else None
    )
    pipeline_rate = scored_rows / base["wall_s"]
    throughput_ratio = pipeline_rate / kernel["rows_per_s"]
    scoring_step_rate = scored_rows / max(base["steps_s"].get("scored_candidates", 0.0), 1e-9)
    floor_ratio = scored_rows / max(floor["total_s"], 1e-9) / kernel["rows_per_s"]
    rss_ratio = (
        runs[scales[1].name]["peak_rss_mib"] / base["peak_rss_mib"] if len(scales) > 1 else None
    )

    print()
    print(
        _table(
            [
                ("measure", "value", "target"),
                ("scored candidate rows", f"{scored_rows:,}", ""),
                ("pipeline rows/s (end to end)", f"{pipeline_rate:,.0f}", ""),
                ("ranker kernel rows/s", f"{kernel['rows_per_s']:,.0f}", ""),
                ("pipeline / kernel", f"{throughput_ratio:.3f}", f">= {THROUGHPUT_TARGET}"),
                (
                    "materialization floor (read, check, write)",
                    f"{floor['total_s']:.1f}s",
                    "",
                ),
                ("pipeline / kernel at that floor", f"{floor_ratio:.3f}", ""),
                ("scored_candidates step rows/s", f"{scoring_step_rate:,.0f}", ""),
                (
                    "scored_candidates step / kernel",
                    f"{scoring_step_rate / kernel['rows_per_s']:.3f}",
                    "",
                ),
                *(
                    (f"peak RSS {name} (MiB)", f"{run['peak_rss_mib']:,.0f}", "")
                    for name, run in runs.items()
                ),
                (
                    "peak RSS 2x / 1x",
                    "skipped" if rss_ratio is None else f"{rss_ratio:.3f}",
                    f"<= {RSS_RATIO_TARGET}",
                ),
            ]
        )
    )
    print()
    steps = [("step", *runs)]
    for step in PARTITION_ASSETS:
        steps.append((step, *(f"{run['steps_s'].get(step, 0.0):.1f}s" for run in runs.values())))
    steps.append(("partition run", *(f"{run['wall_s']:.1f}s" for run in runs.values())))
    steps.append(
        ("rows scored", *(f"{run['rows'].get('scored_candidates', 0):,}" for run in runs.values()))
    )
    print(_table(steps))
    if components:
        print()
        print(
            _table(
                [
                    ("component", "ours", "baseline", "ratio", "target"),
                    *(
                        (
                            name,
                            f"{found['ours']:,.0f} {found['unit']}",
                            f"{found['baseline']:,.0f} ({found['baseline_name']})",
                            f"{found['ratio']:.3f}",
                            f">= {found['target']}",
                        )
                        for name, found in components.items()
                    ),
                ]
            )
        )

    summary: dict[str, Any] = {
        "benchmark": "pipeline_partition",
        "scale": args.scale,
        "partition": f"{args.surface}|{args.region}",
        "model_version": bundle.get("model_version"),
        "scored_rows": scored_rows,
        "pipeline_wall_s": round(base["wall_s"], 2),
        "pipeline_rows_per_s": round(pipeline_rate),
        "kernel_rows_per_s": round(kernel["rows_per_s"]),
        "kernel_device": kernel["device"],
        "kernel_torch_threads": kernel["torch_threads"],
        "throughput_ratio": round(throughput_ratio, 4),
        "materialization_floor": floor,
        "throughput_ratio_at_floor": round(floor_ratio, 4),
        "scoring_step_rows_per_s": round(scoring_step_rate),
        "scoring_step_ratio": round(scoring_step_rate / kernel["rows_per_s"], 4),
        "throughput_target": THROUGHPUT_TARGET,
        "meets_throughput_target": throughput_ratio >= THROUGHPUT_TARGET,
        "peak_rss_mib": {name: round(run["peak_rss_mib"], 1) for name, run in runs.items()},
        "rss_ratio_2x": None if rss_ratio is None else round(rss_ratio, 3),
        "rss_ratio_target": RSS_RATIO_TARGET,
        "meets_rss_target": None if rss_ratio is None else rss_ratio <= RSS_RATIO_TARGET,
        "steps_s": {
            name: {step: round(seconds, 2) for step, seconds in run["steps_s"].items()}
            for name, run in runs.items()
        },
        "rows": {name: run["rows"] for name, run in runs.items()},
        "components": components,
        "side_by_side": compared,
        "bench_peak_rss_mib": round(_rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
