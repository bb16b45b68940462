"""A partition with no eligible subject publishes an empty version marked as such; an empty
version for a non-empty audience is still refused."""

from __future__ import annotations

from recsys_assets.publish import publish_version, read_manifest
from recsys_assets.publish.validation import EMPTY_VERSION_NOTE
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import REGION, SURFACE, later, make_lists, settings


def _publish_no_lists(warehouse: Warehouse, *, audience: int):
    lists, items, subjects = make_lists()
    return publish_version(
        warehouse, settings(), SURFACE, REGION, lists.iloc[0:0], items=items,
        subjects=subjects.iloc[:audience], now=later(1), tracking_secret="s",
    )  # fmt: skip


def test_no_eligible_subject_publishes_an_empty_version_marked_empty(
    local_warehouse: Warehouse,
) -> None:
    outcome = _publish_no_lists(local_warehouse, audience=0)

    assert outcome.published, outcome.failures
    assert outcome.report.empty
    assert "(empty: no eligible subject; serving uses the fallback lists)" in outcome.summary()
    assert EMPTY_VERSION_NOTE in outcome.report.to_markdown()  # the Dagster `validation` metadata
    manifest = read_manifest(local_warehouse, SURFACE, REGION)
    assert manifest is not None and manifest.active_version == outcome.version
    assert manifest.validation["empty"] is True  # what `recsys manifest` prints
    report = local_warehouse.read_json(f"{outcome.path}/validation.json")
    assert report["validation"]["empty"] is True


def test_a_normal_version_is_not_marked_empty(local_warehouse: Warehouse) -> None:
    lists, items, subjects = make_lists()
    outcome = publish_version(
        local_warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        now=later(1), tracking_secret="s",
    )  # fmt: skip
    assert outcome.published and not outcome.report.empty
    assert EMPTY_VERSION_NOTE not in outcome.report.to_markdown()
    assert read_manifest(local_warehouse, SURFACE, REGION).validation["empty"] is False


def test_no_lists_for_a_non_empty_audience_is_refused(local_warehouse: Warehouse) -> None:
    outcome = _publish_no_lists(local_warehouse, audience=3)

    assert not outcome.published
    assert outcome.report.empty
    assert "non_empty" in outcome.report.failed_checks()
    assert read_manifest(local_warehouse, SURFACE, REGION) is None
