"""Benchmark: the scoring kernel on the CPU and, when CUDA is there, on the GPU in fp32 and bf16.

    python benchmarks/bench_gpu_scoring.py [--rows 2000000] [--repeats 3] [--warehouse DIR]

The bundle's ranker through `pipeline.assets.score_in_blocks` (fixed 4,096-row forward
passes, calibration included; on CUDA the blocks stream through pinned memory), side by side
in one process over the same rows: CPU fp32 (the default path), CPU bf16, CUDA fp32 and CUDA
bf16 (reported as "not available" without CUDA). Rows/s of each (best of `--repeats` after
one warm-up pass) and its ratio to CPU fp32; agreement of each with CPU fp32 (max abs diff of
calibrated probabilities), and of CUDA bf16 with CUDA fp32; peak RSS of the process and, per
CUDA mode, the peak GPU memory torch allocated.

The bundle: `--warehouse`, else the medium one `benchmarks/bench_pipeline.py` trains
(`benchmarks/output/bench_pipeline/medium`) when present, else a tiny seeded warehouse
trained here on first use (`benchmarks/output/bench_gpu_scoring/tiny`, seconds). The rows:
that warehouse's home_feed × na scored_candidates feature sample (real gathered feature
rows, repeated up to `--rows`) when it has one, else gamma-distributed rows as
bench_pipeline's kernel uses. The last line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_assets.config import load_settings
from recsys_assets.data.seed import seed_warehouse
from recsys_assets.models.bundle import (
    ModelBundle,
    current_model_version,
    load_bundle,
    train_bundle,
)
from recsys_assets.models.ranker import RankerModel
from recsys_assets.pipeline.assets import FEATURE_SAMPLE, score_in_blocks
from recsys_assets.pipeline.features import FEATURE_COLUMNS
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.shards import stage_path
from recsys_assets.warehouse import Warehouse

OUTPUT = Path(__file__).resolve().parent / "output"
MEDIUM = OUTPUT / "bench_pipeline" / "medium"
TINY = OUTPUT / "bench_gpu_scoring" / "tiny"
TINY_AS_OF = datetime(2026, 1, 15)
PARTITION = SurfaceRegion("home_feed", "na")
MODES = (("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "bf16"))
NOT_AVAILABLE = "not available"


def bundle_warehouse(requested: Path | None) -> tuple[Warehouse, str]:
    """The warehouse whose bundle is measured, and where it came from."""
    if requested is not None:
        return Warehouse(requested.resolve().as_uri()), str(requested)
    if (MEDIUM / "models" / "current.json").exists():
        return Warehouse(MEDIUM.as_uri()), "bench_pipeline medium"
    warehouse = Warehouse(TINY.as_uri())
    if current_model_version(warehouse) is None:
        settings = load_settings()
        seed_warehouse(warehouse, scale="tiny", seed=11, settings=settings, as_of=TINY_AS_OF)
        train_bundle(warehouse, settings)
    return warehouse, "tiny, trained here"


def feature_rows(warehouse: Warehouse, rows: int) -> tuple[np.ndarray, str]:
    """`rows` × FEATURE_COLUMNS float32: the partition's feature sample repeated, or gamma
    rows when the warehouse has none."""
    sample_path = f"{stage_path('scored_candidates', PARTITION.path)}/{FEATURE_SAMPLE}"
    if warehouse.exists(sample_path):
        sample = warehouse.read_parquet(sample_path, columns=FEATURE_COLUMNS)
        matrix = sample.to_numpy(dtype=np.float32)
        repeats = -(-rows // len(matrix))
        return np.ascontiguousarray(np.tile(matrix, (repeats, 1))[:rows]), (
            f"feature sample of {PARTITION.path} ({len(matrix):,} distinct rows, repeated)"
        )
    generator = np.random.default_rng(0)
    matrix = generator.gamma(1.0, 3.0, (rows, len(FEATURE_COLUMNS))).astype(np.float32)
    return matrix, "gamma(1, 3) rows"


def on_device(bundle: ModelBundle, device: torch.device) -> ModelBundle:
    """The same bundle with its ranker on `device`."""
    ranker = RankerModel.from_bytes(bundle.ranker.to_bytes(), device=device)
    return dataclasses.replace(bundle, ranker=ranker)


def measure(
    bundle: ModelBundle, matrix: np.ndarray, precision: str, repeats: int
) -> tuple[dict[str, Any], np.ndarray]:
    """Best-of-`repeats` seconds of score_in_blocks after one warm-up pass, and its
    calibrated probabilities."""
    cuda = bundle.ranker.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _, calibrated = score_in_blocks(bundle, matrix, precision=precision)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        score_in_blocks(bundle, matrix, precision=precision)
        seconds.append(time.perf_counter() - started)
    best = min(seconds)
    result: dict[str, Any] = {"best_s": best, "rows_per_s": len(matrix) / best}
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result, calibrated


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warehouse", type=Path)
    args = parser.parse_args()

    warehouse, source = bundle_warehouse(args.warehouse)
    bundle = load_bundle(warehouse, device=torch.device("cpu"))
    matrix, rows_source = feature_rows(warehouse, args.rows)
    gpu = torch.cuda.is_available()
    modes: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    for device, precision in MODES:
        name = f"{device}_{precision}"
        if device == "cuda" and not gpu:
            modes[name] = NOT_AVAILABLE
            continue
        moved = on_device(bundle, torch.device(device)) if device == "cuda" else bundle
        modes[name], scores[name] = measure(moved, matrix, precision, args.repeats)
        print(f"{name:<10} {modes[name]['rows_per_s']:>14,.0f} rows/s", flush=True)
    baseline = modes["cpu_fp32"]["rows_per_s"]
    for result in modes.values():
        if isinstance(result, dict):
            result["ratio_vs_cpu_fp32"] = result["rows_per_s"] / baseline
    agreement = {
        f"{name}_vs_cpu_fp32_max_abs_diff": float(np.abs(values - scores["cpu_fp32"]).max())
        for name, values in scores.items()
        if name != "cpu_fp32"
    }
    if gpu:
        agreement["cuda_bf16_vs_cuda_fp32_max_abs_diff"] = float(
            np.abs(scores["cuda_bf16"] - scores["cuda_fp32"]).max()
        )
    for name, value in agreement.items():
        print(f"{name:<40} {value:.3g}")
    summary = {
        "rows": len(matrix),
        "rows_source": rows_source,
        "bundle": {"source": source, "model_version": bundle.info.model_version},
        "bundle_inference": dataclasses.asdict(bundle.info.inference),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if gpu else NOT_AVAILABLE,
        "modes": modes,
        "agreement": agreement,
        "peak_rss_mib": peak_rss_mib(),
    }
    print(f"peak RSS {summary['peak_rss_mib']:.0f} MiB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
