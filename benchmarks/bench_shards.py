"""Benchmark: a sharded partition's heavy steps with 1, 2 and 4 worker processes.

    python benchmarks/bench_shards.py [--scale small] [--surface home_feed] [--region na]
                                      [--shards 4] [--workers 1,2,4] [--fresh]
                                      [--workdir DIR] [--out benchmarks/output/shards.json]

Seeds a warehouse at `--scale` (reused when its snapshot matches), trains the bundle once
(one epoch: this times the pipeline, not training), materializes `subjects` once with
`pipeline.shards = --shards`, then for each worker count materializes the heavy assets
(candidate_pools → features_asof → scored_candidates → slates, one step per shard) with
Dagster's multiprocess executor (`max_concurrent` = workers) on a fresh instance, with a
pinned score_time, each worker count in a fresh child process whose steps get
cores // workers torch/OpenMP threads (at least 1), as `recsys run` shares the cores
between its workers. Reported side by side in one run:

- wall seconds per worker count and the speed-up over one worker (2 cores here: ≈ 2× at
  best; every step is its own process, so start-up counts too);
- the per-shard throughput a capacity plan uses: candidate rows of a shard / seconds of its
  four shard steps (from the steps' own start/success events of the one-worker run, so
  process start-up is reported apart, as `step_startup_s`);
- peak RSS of the benchmark's process tree (it and every step process, summed) and of
  the largest single step process, sampled from /proc every 0.2 s during each run (Linux).

Writes the summary to `--out` (benchmarks/output/shards.json, read by `recsys plan`), schema:
{"schema": "recsys.bench_shards/1", "device": "cpu", "cores", "per_shard_rows_per_s",
"per_shard_threads", "rows_per_shard", "subjects_per_shard", "shards", "step_startup_s", "workers": {n: {"wall_s",
"speedup", "rows_per_s", "peak_rss_mib", "peak_step_rss_mib", "threads_per_step"}}, "scale",
"partition",
"measured_at", "command"}.
The last line printed is the same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

# bench_pipeline lies beside this file; step processes load this file by its path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import ensure_bundle, ensure_seeded

from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.partitions import SurfaceRegion

HEAVY_ASSETS = ("candidate_pools", "features_asof", "scored_candidates", "slates")
BENCH_JOB = "bench_shard_steps"
SCORE_TIME = "2026-01-15T00:00:00"
"""bench_pipeline's AS_OF: the seeded data's clock."""
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "output" / "bench_shards"
DEFAULT_OUT = Path(__file__).resolve().parent / "output" / "shards.json"
SCHEMA = "recsys.bench_shards/1"
PRELOAD_MODULES = ("torch", "recsys_assets.definitions")


def shard_steps_job() -> dg.JobDefinition:
    """The heavy assets on the multiprocess executor, from the environment's warehouse and
    configuration (RECSYS_WAREHOUSE_URL, RECSYS_CONFIG): each step process rebuilds it."""
    definitions = build_definitions()
    with_job = dg.Definitions(
        assets=definitions.assets,
        resources=definitions.resources,
        jobs=[
            dg.define_asset_job(
                BENCH_JOB,
                selection=dg.AssetSelection.assets(*HEAVY_ASSETS),
                executor_def=dg.multiprocess_executor,
            )
        ],
    )
    return with_job.resolve_job_def(BENCH_JOB)


class TreeRss:
    """Peak RSS of this process and its descendants (summed) and of the largest one,
    sampled from /proc in a background thread while a run is in flight."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_tree_mib = 0.0
        self.peak_process_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            sizes = [_rss_mib(pid) for pid in _tree(os.getpid())]
            self.peak_tree_mib = max(self.peak_tree_mib, sum(sizes))
            self.peak_process_mib = max([self.peak_process_mib, *sizes])


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc/*/stat parent ids."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run_config(workers: int) -> dict[str, Any]:
    return {
        "execution": {
            "config": {
                "max_concurrent": workers,
                # Step processes fork from a server that imported the code location once,
                # instead of each importing torch, pandas and Dagster again.
                "start_method": {"forkserver": {"preload_modules": list(PRELOAD_MODULES)}},
            }
        },
        "resources": {"recsys": {"config": {"score_time": SCORE_TIME}}},
        "loggers": {
            "console": {"config": {"log_level": os.environ.get("BENCH_LOG_LEVEL", "WARNING")}}
        },
    }


def _step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Seconds of each successful step, from its own start and success events."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS":
            seconds[event.step_key] = entry.timestamp - started[event.step_key]
    return seconds


def run_heavy_steps(workers: int, dagster_home: Path, partition: SurfaceRegion) -> dict[str, Any]:
    """One multiprocess run of the heavy steps; wall seconds, step seconds, metadata."""
    shutil.rmtree(dagster_home, ignore_errors=True)
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance, TreeRss() as rss:
        started = time.perf_counter()
        result = dg.execute_job(
            dg.reconstructable(shard_steps_job),
            instance=instance,
            run_config=_run_config(workers),
            tags={"dagster/partition": str(partition.to_key())},
            raise_on_error=False,
        )
        wall = time.perf_counter() - started
        if not result.success:
            failures = [e.step_key for e in result.all_events if e.is_step_failure]
            raise SystemExit(f"heavy steps failed with {workers} worker(s): {failures}")
        rows = {
            event.asset_key.to_user_string(): event.materialization.metadata["dagster/row_count"]
            for event in result.get_asset_materialization_events()
        }
        return {
            "wall_s": wall,
            "steps": _step_seconds(instance, result.run_id),
            "candidate_rows": int(rows["candidate_pools"].value),
            "peak_rss_mib": rss.peak_tree_mib,
            "peak_step_rss_mib": rss.peak_process_mib,
        }


def materialize_subjects(partition: SurfaceRegion) -> int:
    """`subjects` for the partition (it decides the shards); returns the subject count."""
    definitions = build_definitions()
    job = dg.Definitions(
        assets=definitions.assets,
        resources=definitions.resources,
        jobs=[dg.define_asset_job("bench_subjects", selection=["subjects"])],
    ).resolve_job_def("bench_subjects")
    result = job.execute_in_process(
        partition_key=partition.to_key(),
        run_config={"resources": {"recsys": {"config": {"score_time": SCORE_TIME}}}},
    )
    return int(result.asset_materializations_for_node("subjects")[0].metadata["subjects"].value)


def per_shard(steps: dict[str, float], shards: int, candidate_rows: int) -> dict[str, float]:
    """Candidate rows per second of one shard through its four shard steps (mean shard)."""
    shard_seconds = [
        sum(steps[f"{asset}.{asset}_shard[shard_{index:05d}]"] for asset in HEAVY_ASSETS)
        for index in range(shards)
    ]
    rows_per_shard = candidate_rows / shards
    mean_seconds = sum(shard_seconds) / shards
    return {
        "per_shard_rows_per_s": rows_per_shard / mean_seconds,
        "rows_per_shard": rows_per_shard,
        "shard_seconds_mean": mean_seconds,
    }


def run_in_child(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """`run_heavy_steps` in a fresh process (its own forkserver), with each step's
    torch / OpenMP threads set to cores // workers (at least 1), as `recsys run` shares
    the cores between its worker processes."""
    result = args.workdir / args.scale / f"run_{workers}.json"
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            *("--scale", args.scale, "--surface", args.surface, "--region", args.region),
            *("--workdir", str(args.workdir)),
            *("--child-workers", str(workers), "--child-result", str(result)),
        ],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
    )
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small")
    parser.add_argument("--surface", default="home_feed")
    parser.add_argument("--region", default="na")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    partition = SurfaceRegion(args.surface, args.region)
    if args.child_workers:
        folder = args.workdir / args.scale / f"dagster_{args.child_workers}"
        run = run_heavy_steps(args.child_workers, folder, partition)
        args.child_result.write_text(json.dumps(run))
        return
    from recsys_assets.data.seed import SCALES

    workers = [int(value) for value in args.workers.split(",")]
    folder = args.workdir / args.scale
    seeded = ensure_seeded(folder / "warehouse", SCALES[args.scale], args.seed, args.fresh)
    bundle = ensure_bundle(folder / "warehouse", args.fresh or not seeded["reused"])
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["pipeline"]["shards"] = args.shards
    config_path = folder / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config))
    os.environ["RECSYS_WAREHOUSE_URL"] = (folder / "warehouse").resolve().as_uri()
    os.environ["RECSYS_CONFIG"] = str(config_path)
    os.environ.setdefault("RECSYS_TRACKING_SECRET", "bench-only")
    subjects = materialize_subjects(partition)

    runs = {count: run_in_child(count, args) for count in workers}
    baseline = runs[workers[0]]
    shard = per_shard(baseline["steps"], args.shards, baseline["candidate_rows"])
    step_total = sum(baseline["steps"].values())
    steps_count = len(baseline["steps"])
    summary = {
        "schema": SCHEMA,
        "device": "cpu",
        "cores": os.cpu_count(),
        "per_shard_rows_per_s": round(shard["per_shard_rows_per_s"], 1),
        "rows_per_shard": round(shard["rows_per_shard"], 1),
        "subjects_per_shard": round(subjects / args.shards, 1),
        "shard_seconds_mean": round(shard["shard_seconds_mean"], 3),
        # The threads each step of the run behind per_shard_rows_per_s had (its first).
        "per_shard_threads": max(1, (os.cpu_count() or 1) // workers[0]),
        "shards": args.shards,
        "step_startup_s": round(max(0.0, baseline["wall_s"] - step_total) / steps_count, 3),
        "workers": {
            str(count): {
                "wall_s": round(run["wall_s"], 2),
                "speedup": round(baseline["wall_s"] / run["wall_s"], 3),
                "rows_per_s": round(run["candidate_rows"] / run["wall_s"], 1),
                "peak_rss_mib": round(run["peak_rss_mib"], 1),
                "peak_step_rss_mib": round(run["peak_step_rss_mib"], 1),
                "threads_per_step": max(1, (os.cpu_count() or 1) // count),
            }
            for count, run in runs.items()
        },
        "candidate_rows": baseline["candidate_rows"],
        "subjects": subjects,
        "scale": args.scale,
        "partition": f"{partition.surface}/{partition.region}",
        "seeded": "reused" if seeded["reused"] else "fresh",
        "bundle": bundle["model_version"],
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
