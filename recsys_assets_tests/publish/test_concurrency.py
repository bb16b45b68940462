"""Readers, crashes and concurrent publishers never see or leave a partial version."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
from typing import Any

import pytest

from recsys_assets.publish import publish_version, read_manifest
from recsys_assets.publish.versions import read_version_report
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import REGION, SURFACE, later, make_lists, settings
from recsys_assets_tests.publish.workers import publish_times, publish_until_killed

_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")  # fmt: skip


def _child_env() -> dict[str, str]:
    return {key: os.environ[key] for key in _ENV_KEYS if key in os.environ}


@pytest.fixture(scope="module")
def processes() -> Any:
    """Children forked from a clean, preloaded server: fast to start, no inherited threads."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["recsys_assets_tests.publish.workers"])
    return context


def _assert_serves_a_complete_version(warehouse: Warehouse) -> str:
    """The manifest names a validated version whose lists read completely."""
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert manifest is not None
    report = read_version_report(warehouse, manifest.active_path)
    assert report is not None and report["validation"]["passed"]
    lists = warehouse.read_parquet(f"{manifest.active_path}/lists.parquet")
    assert set(lists["version"]) == {manifest.active_version}
    assert len(lists) == manifest.validation["metrics"]["rows"]
    return manifest.active_version


def _publish(warehouse: Warehouse) -> str:
    lists, items, subjects = make_lists()
    outcome = publish_version(
        warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        now=later(1), tracking_secret="test",
    )  # fmt: skip
    assert outcome.published, outcome.failures
    return outcome.version


def _wait_for_a_new_version(warehouse: Warehouse, before: str) -> None:
    deadline = time.monotonic() + 20
    while read_manifest(warehouse, SURFACE, REGION).active_version == before:
        assert time.monotonic() < deadline, "the publisher process never published"
        time.sleep(0.005)


@pytest.mark.parametrize(("kind", "publishes"), [("local", 100), ("s3", 8)])
def test_a_polling_reader_never_sees_a_missing_or_partial_version(
    request: pytest.FixtureRequest, kind: str, publishes: int
) -> None:
    """S3 runs fewer publishes: each one costs a dozen requests to the moto server."""
    warehouse: Warehouse = request.getfixturevalue(f"{kind}_warehouse")
    first = _publish(warehouse)
    stop = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def poll() -> None:
        reader = Warehouse(warehouse.url)
        while not stop.is_set():
            try:
                seen.append(_assert_serves_a_complete_version(reader))
            except Exception as error:  # collected, so the assertion shows every one
                problems.append(repr(error))
            time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        published = [_publish(warehouse) for _ in range(publishes)]
    finally:
        stop.set()
        thread.join()

    assert problems == []
    assert len(set(seen)) > publishes // 4  # the reader really polled across many flips
    assert set(seen) <= {first, *published}
    assert seen == sorted(seen)  # and never went back to an older version


def test_a_publisher_killed_at_random_points_leaves_a_servable_manifest(
    local_warehouse: Warehouse, processes: Any
) -> None:
    warehouse = local_warehouse
    _publish(warehouse)
    rng = random.Random(4)
    versions = {_assert_serves_a_complete_version(warehouse)}
    for _ in range(20):
        before = read_manifest(warehouse, SURFACE, REGION).active_version
        child = processes.Process(target=publish_until_killed, args=(warehouse.url, _child_env()))
        child.start()
        _wait_for_a_new_version(warehouse, before)  # the child is now publishing in a loop
        time.sleep(rng.uniform(0.0, 0.15))  # about one publish: a random point inside it
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        versions.add(_assert_serves_a_complete_version(warehouse))
    assert len(versions) > 20
    _publish(warehouse)  # no lock or half-written folder blocks the next publisher


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_concurrent_publishers_lose_no_update(
    request: pytest.FixtureRequest, kind: str, processes: Any
) -> None:
    warehouse: Warehouse = request.getfixturevalue(f"{kind}_warehouse")
    each = 4
    with processes.Pool(2) as pool:
        results = pool.starmap(publish_times, [(warehouse.url, _child_env(), each, 50)] * 2)
        # Let the workers exit on their own: the `with` block's terminate() can wait forever
        # on a worker that the signal finds blocked on the pool's queue lock.
        pool.close()
        pool.join()
    published = {version for result in results for version in result}
    assert len(published) == 2 * each
    manifest = read_manifest(warehouse, SURFACE, REGION)
    assert manifest is not None
    assert {entry.version for entry in manifest.history} == published
    assert manifest.active_version == max(published)  # the newest version wins
    assert [e.status for e in manifest.history].count("active") == 1
    _assert_serves_a_complete_version(warehouse)
