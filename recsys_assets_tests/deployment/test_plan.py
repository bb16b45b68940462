"""`recsys plan`: the arithmetic with exact numbers, the benchmark file, the command."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from recsys_assets.cli import main
from recsys_assets.deployment.plan import (
    PlanError,
    PlanRequest,
    Throughput,
    format_plan,
    load_throughput,
    measure_bytes_per_candidate_row,
    plan_capacity,
)
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.shards import stage_path
from recsys_assets.warehouse import Warehouse

CPU = Throughput(
    device="cpu",
    per_shard_rows_per_s=150_000.0,
    step_startup_s=2.5,
    bytes_per_candidate_row=40.0,
    measured_at="2026-11-30T13:00:00+00:00",
    source="shards.json",
)
TEN_MILLION = PlanRequest(
    users=10_000_000,
    candidates=5_000,
    surfaces=5,
    regions=4,
    shard_subjects=4_000,
    parallelism=64,
    window=timedelta(hours=24),
)


def test_ten_million_users_on_64_cores() -> None:
    plan = plan_capacity(TEN_MILLION, CPU)
    assert plan.partitions == 20
    assert plan.subjects_per_partition == 2_500_000
    assert plan.shards_per_partition == 625
    assert plan.shards == 12_500
    assert plan.shard_steps == 50_000
    assert plan.candidate_rows == 250_000_000_000
    # 250e9 rows / 150e3 rows/s + 50,000 steps × 2.5 s = 1,666,666.67 s + 125,000 s.
    assert plan.device_hours == pytest.approx((250e9 / 150e3 + 125_000) / 3600)
    assert plan.waves == 196  # ceil(12,500 / 64)
    # A shard: 4,000 × 5,000 rows / 150,000 rows/s + 4 × 2.5 s = 143.333 s.
    assert plan.wall_seconds == pytest.approx(196 * (20_000_000 / 150_000 + 10))
    assert plan.storage_bytes == 250_000_000_000 * 40
    assert plan.refresh_share == 1.0


def test_a_window_too_short_gives_the_incremental_share() -> None:
    plan = plan_capacity(dataclasses.replace(TEN_MILLION, parallelism=8), CPU)
    assert plan.waves == 1_563
    wall = 1_563 * (20_000_000 / 150_000 + 10)
    assert plan.wall_seconds == pytest.approx(wall)
    assert plan.refresh_share == pytest.approx(86_400 / wall)
    text = format_plan(plan)
    assert f"refreshes {86_400 / wall:.1%} of the subjects" in text


def test_uneven_users_round_up_to_whole_shards() -> None:
    request = PlanRequest(
        users=10_001,
        candidates=10,
        surfaces=1,
        regions=2,
        shard_subjects=1_000,
        parallelism=3,
        window=timedelta(hours=1),
    )
    plan = plan_capacity(request, CPU)
    assert plan.subjects_per_partition == 5_001
    assert plan.shards_per_partition == 6
    assert plan.shards == 12
    assert plan.waves == 4


def test_the_printed_plan_names_every_quantity() -> None:
    text = format_plan(plan_capacity(TEN_MILLION, CPU))
    for expected in (
        "10,000,000 users × 5,000 candidates × 5 surfaces × 4 regions",
        "12,500 (625 per partition of 4,000 subjects)",
        "50,000 (candidate_pools, features_asof, scored_candidates, slates per shard)",
        "250,000,000,000 per full run",
        "core-hours      497.7",
        "7.8 h at 64 cores (196 waves of shards)",
        "9.1 TiB per full run (40.0 B per candidate row)",
        "a full refresh fits a 24 h window (33% of it)",
    ):
        assert expected in text, (expected, text)


def test_gpu_measurement_is_read_from_its_entry(tmp_path: Path) -> None:
    path = tmp_path / "shards.json"
    path.write_text(
        json.dumps(
            {
                "device": "cpu",
                "per_shard_rows_per_s": 150000.0,
                "measured_at": "t1",
                "gpu": {
                    "device": "cuda",
                    "per_shard_rows_per_s": 2000000.0,
                    "measured_at": "t2",
                    "bytes_per_candidate_row": 38.5,
                },
            }
        )
    )
    gpu = load_throughput("gpu", path)
    assert (gpu.device, gpu.per_shard_rows_per_s, gpu.measured_at) == ("gpu", 2e6, "t2")
    assert gpu.bytes_per_candidate_row == 38.5
    cpu = load_throughput("cpu", path, bytes_per_row=41.0)
    assert (cpu.per_shard_rows_per_s, cpu.bytes_per_candidate_row) == (150000.0, 41.0)


def test_missing_or_unusable_measurements_name_the_command(tmp_path: Path) -> None:
    path = tmp_path / "shards.json"
    with pytest.raises(PlanError, match=r"run `python benchmarks/bench_shards\.py` first"):
        load_throughput("cpu", path)
    path.write_text(json.dumps({"device": "cpu", "per_shard_rows_per_s": 150000.0}))
    with pytest.raises(PlanError, match="has no gpu measurement"):
        load_throughput("gpu", path)
    path.write_text(json.dumps({"device": "cpu", "per_shard_rows_per_s": 0}))
    with pytest.raises(PlanError, match="per_shard_rows_per_s of the cpu entry"):
        load_throughput("cpu", path)
    # A damaged measurement never turns into a plausible-looking plan.
    for field, value in (
        ("step_startup_s", -100),
        ("step_startup_s", "abc"),
        ("bytes_per_candidate_row", -75.2),
        ("bytes_per_candidate_row", float("nan")),
    ):
        path.write_text(
            json.dumps({"device": "cpu", "per_shard_rows_per_s": 150000.0, field: value})
        )
        with pytest.raises(PlanError, match=rf"{path}: {field} of the cpu entry must be a finite"):
            load_throughput("cpu", path)


def test_plan_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shards.json"
    path.write_text(
        json.dumps(
            {
                "device": "cpu",
                "per_shard_rows_per_s": 150000.0,
                "step_startup_s": 2.5,
                "measured_at": "2026-11-30T13:00:00+00:00",
            }
        )
    )
    code = main(
        [
            "plan",
            "--users",
            "10000000",
            "--candidates",
            "5000",
            "--surfaces",
            "5",
            "--regions",
            "4",
            "--cores",
            "64",
            "--bytes-per-row",
            "40",
            "--benchmark",
            str(path),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == format_plan(plan_capacity(TEN_MILLION, CPU))
    assert (
        main(
            ["plan", "--users", "10", "--candidates", "5", "--gpus", "1", "--benchmark", str(path)]
        )
        == 2
    )
    assert "has no gpu measurement" in capsys.readouterr().err


def test_bytes_per_candidate_row_is_measured_from_a_partition_run(
    local_warehouse: Warehouse,
) -> None:
    partition = SurfaceRegion("home_feed", "na")
    pools = pd.DataFrame({"subject_id": range(1000), "item_id": range(1000)})
    for stage, frame in (("candidate_pools", pools), ("slates", pools.head(100))):
        for shard in range(2):
            local_warehouse.write_parquet(
                f"{stage_path(stage, partition.path)}/part-{shard:05d}.parquet", frame
            )
    written = sum(
        file.stat().st_size for file in Path(local_warehouse.root, "pipeline").rglob("*.parquet")
    )
    assert measure_bytes_per_candidate_row(local_warehouse, partition) == written / 2000
    with pytest.raises(PlanError, match="no candidate pools for push/eu"):
        measure_bytes_per_candidate_row(local_warehouse, SurfaceRegion("push", "eu"))


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("--bytes-per-row", "-3", "must be a positive number"),
        ("--bytes-per-row", "nan", "must be a positive number"),
        ("--bytes-per-row", "inf", "must be a positive number"),
        ("--window", "1000000000d", "out of range"),
        ("--window", "0h", "must be a positive duration"),
        ("--users", "0", "must be between 1 and"),
        ("--users", "abc", "must be a whole number (got 'abc')"),
        ("--bytes-per-row", "lots", "must be a number (got 'lots')"),
        ("--candidates", str(10**13), "must be between 1 and"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    argument: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = {"--users": "1000", "--candidates": "10", argument: value}
    with pytest.raises(SystemExit) as exited:
        main(["plan", *(part for pair in arguments.items() for part in pair)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert argument in error and message in error


def test_more_regions_than_users_is_no_plan() -> None:
    request = dataclasses.replace(TEN_MILLION, users=10, regions=20)
    with pytest.raises(PlanError, match="20 regions for 10 users"):
        plan_capacity(request, CPU)


def test_a_step_measured_on_two_threads_takes_two_cores() -> None:
    one = plan_capacity(TEN_MILLION, CPU)
    two = plan_capacity(TEN_MILLION, dataclasses.replace(CPU, cores_per_step=2))
    assert two.device_hours == pytest.approx(2 * one.device_hours)
    assert two.waves == math.ceil(one.shards / (TEN_MILLION.parallelism // 2))
    assert "on 2 cores" in format_plan(two) and "on one core" in format_plan(one)


def test_fewer_cores_than_one_step_was_measured_on_is_no_plan() -> None:
    request = dataclasses.replace(TEN_MILLION, parallelism=1)
    with pytest.raises(PlanError, match="--cores 1 is fewer than the 2 cores one shard step"):
        plan_capacity(request, dataclasses.replace(CPU, cores_per_step=2))


def test_storage_beyond_counting_is_said_not_crashed() -> None:
    plan = plan_capacity(TEN_MILLION, dataclasses.replace(CPU, bytes_per_candidate_row=1e300))
    assert "storage         more than can be counted per full run" in format_plan(plan)


def test_the_measurement_is_checked_before_the_warehouse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "shards.json"
    arguments = ["plan", "--users", "1000", "--candidates", "10", "--benchmark", str(missing)]
    assert main([*arguments, "--bytes-from", "home_feed/na"]) == 2
    assert "run `python benchmarks/bench_shards.py` first" in capsys.readouterr().err
    missing.write_text(json.dumps({"device": "cpu", "per_shard_rows_per_s": 150000.0}))
    assert main([*arguments, "--bytes-from", "fax/na"]) == 2
    assert "unknown surface 'fax'" in capsys.readouterr().err
