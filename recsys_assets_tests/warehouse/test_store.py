"""The warehouse against a local folder and a real S3 API (moto's server, through s3fs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from recsys_assets.warehouse import PreconditionFailed, Warehouse, WarehouseError


def test_parquet_parts_round_trip_with_columns_and_filter(warehouse: Warehouse) -> None:
    first = pd.DataFrame(
        {
            "user_id": [1, 2],
            "region": ["na", "eu"],
            "ts": pd.to_datetime(["2026-11-01", "2026-11-02"]).astype("datetime64[ns]"),
        }
    )
    second = pd.DataFrame(
        {
            "user_id": [3],
            "region": ["na"],
            "ts": pd.to_datetime(["2026-11-03"]).astype("datetime64[ns]"),
        }
    )
    warehouse.write_parquet("raw/users/part-00000.parquet", first)
    warehouse.write_parquet("raw/users/part-00001.parquet", second)

    both = warehouse.read_parquet("raw/users")
    pd.testing.assert_frame_equal(both, pd.concat([first, second], ignore_index=True))
    regions = warehouse.read_parquet(
        "raw/users", columns=["user_id"], filter=ds.field("region") == "na"
    )
    assert regions["user_id"].tolist() == [1, 3]
    assert warehouse.parquet_parts("raw/users") == [
        "raw/users/part-00000.parquet",
        "raw/users/part-00001.parquet",
    ]
    assert warehouse.list_dirs("raw") == ["users"]
    with pytest.raises(FileNotFoundError, match="not in the warehouse"):
        warehouse.read_parquet("raw/items")


def test_replace_folder_drops_parts_not_rewritten(warehouse: Warehouse) -> None:
    frame = pd.DataFrame({"x": [1]})
    warehouse.replace_folder("out/p", {"part-00000.parquet": frame, "part-00001.parquet": frame})
    warehouse.replace_folder("out/p", {"part-00000.parquet": frame.assign(x=2)})
    assert warehouse.list("out/p") == ["out/p/part-00000.parquet"]
    assert warehouse.read_parquet("out/p")["x"].tolist() == [2]


def test_readers_never_see_a_partial_object_during_replacement(warehouse: Warehouse) -> None:
    """Each read during repeated replacement is one whole version, never a mix or a prefix."""
    size = 1 << 20
    versions = [bytes([value]) * size for value in (ord("a"), ord("b"))]
    warehouse.write_bytes("lists/current.bin", versions[0])
    stop = threading.Event()
    seen: list[bytes] = []

    def read_until_stopped() -> None:
        while not stop.is_set():
            seen.append(warehouse.read_bytes("lists/current.bin"))

    with ThreadPoolExecutor(max_workers=1) as pool:
        reader = pool.submit(read_until_stopped)
        for round_number in range(12):
            warehouse.write_bytes("lists/current.bin", versions[round_number % 2])
        stop.set()
        reader.result()
    assert seen
    assert all(data in versions for data in seen)
    assert warehouse.list("lists") == ["lists/current.bin"]  # no temp files left behind


def test_conditional_write_guards_against_a_concurrent_writer(warehouse: Warehouse) -> None:
    warehouse.write_bytes_if("manifest.json", b'{"v": 1}', expected_etag=None)
    with pytest.raises(PreconditionFailed, match="changed concurrently"):
        warehouse.write_bytes_if("manifest.json", b'{"v": 0}', expected_etag=None)

    seen_by_both = warehouse.etag("manifest.json")
    warehouse.write_bytes_if("manifest.json", b'{"v": 2}', expected_etag=seen_by_both)
    with pytest.raises(PreconditionFailed):
        warehouse.write_bytes_if("manifest.json", b'{"v": 3}', expected_etag=seen_by_both)
    assert warehouse.read_json("manifest.json") == {"v": 2}
    assert warehouse.etag("missing.json") is None


def test_racing_publishers_exactly_one_wins(warehouse: Warehouse) -> None:
    warehouse.write_json("manifest.json", {"v": 0})
    tag = warehouse.etag("manifest.json")

    def publish(value: int) -> bool:
        try:
            warehouse.write_bytes_if(
                "manifest.json", f'{{"v": {value}}}'.encode(), expected_etag=tag
            )
        except PreconditionFailed:
            return False
        return True

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(publish, range(1, 5)))
    assert outcomes.count(True) == 1
    assert warehouse.read_json("manifest.json") == {"v": outcomes.index(True) + 1}


def test_paths_and_urls_are_checked(local_warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="escapes the warehouse"):
        local_warehouse.path("raw/../../etc/passwd")
    with pytest.raises(WarehouseError, match="unsupported scheme 'ftp'"):
        Warehouse("ftp://host/x")
    with pytest.raises(WarehouseError, match="no bucket"):
        Warehouse("s3:///prefix")
    assert Warehouse.from_env().url == local_warehouse.url
    assert local_warehouse.uri("raw/users") == f"{local_warehouse.url}/raw/users"


def test_s3_objects_are_visible_to_a_fresh_client(s3_warehouse: Warehouse) -> None:
    s3_warehouse.write_json("published/manifest.json", {"active_version": "v1"})
    fresh = Warehouse(s3_warehouse.url)
    assert fresh.read_json("published/manifest.json") == {"active_version": "v1"}
    fresh.delete("published", recursive=True)
    assert not s3_warehouse.exists("published/manifest.json")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lock_that_looks_orphaned_never_lets_a_second_writer_in(
    local_warehouse: Warehouse,
) -> None:
    """Regression: a waiter that judged the lock orphaned (its pid dead) used to unlink a
    live holder's lock and write beside it; an OS lock cannot be taken from a live holder."""
    local_warehouse.write_json("manifest.json", {"v": 0})
    tag = local_warehouse.etag("manifest.json")
    target = local_warehouse.path("manifest.json")
    folder = Path(target).parent
    entered = threading.Event()
    with local_warehouse._local_lock(target):
        for lock_file in folder.iterdir():  # what a stale judgement saw: a dead owner
            if lock_file.name != "manifest.json":
                lock_file.write_text(str(_dead_pid()))

        def second_writer() -> None:
            local_warehouse.write_bytes_if("manifest.json", b'{"v": 2}', expected_etag=tag)
            entered.set()

        writer = threading.Thread(target=second_writer, daemon=True)
        writer.start()
        assert not entered.wait(0.5), "a second writer got in while the lock was held"
    writer.join(5)
    assert entered.is_set()
    assert local_warehouse.read_json("manifest.json") == {"v": 2}
    assert local_warehouse.list("") == ["manifest.json"]  # lock files stay out of listings


def test_a_lock_holder_killed_mid_write_does_not_block_the_next_writer(
    local_warehouse: Warehouse,
) -> None:
    script = (
        "import os, sys, time\n"
        "from recsys_assets.warehouse import Warehouse\n"
        "w = Warehouse(sys.argv[1])\n"
        "with w._local_lock(w.path('manifest.json')):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, local_warehouse.url], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    local_warehouse.write_bytes_if("manifest.json", b'{"v": 1}', expected_etag=None)
    assert local_warehouse.read_json("manifest.json") == {"v": 1}
