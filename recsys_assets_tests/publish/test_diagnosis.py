"""The short-list diagnosis: a refusal says which history segments are short, on any warehouse."""

from __future__ import annotations

import pandas as pd

from recsys_assets.data.snapshot import raw_table_path
from recsys_assets.publish import publish_version, read_manifest
from recsys_assets.publish.lists import lists_from_slates
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import (
    REGION,
    SURFACE,
    later,
    make_interactions,
    make_items,
    make_slates,
    make_subjects,
    settings,
)

HISTORY = dict(zip(range(100, 110), [0, 1, 2, 3, 5, 6, 10, 11, 12, 30], strict=True))
"""Events per subject, on both sides of every segment edge."""


def test_a_refusal_without_candidate_pools_names_the_short_segments(warehouse: Warehouse) -> None:
    config = settings().surface(SURFACE)
    items, subjects = make_items(60), make_subjects(10)
    short = subjects["subject_id"] <= 105  # up to 6 events: one-item lists
    slates = pd.concat(
        [
            make_slates(subjects[short], items, depth=1),
            make_slates(subjects[~short], items, depth=config.store_depth),
        ]
    )
    lists = lists_from_slates(
        slates, surface=config, region=REGION, ttl=config.ttl, source_data_snapshot="snap"
    )
    warehouse.write_parquet(
        f"{raw_table_path('interactions')}/p.parquet", make_interactions(HISTORY)
    )

    outcome = publish_version(
        warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        now=later(1), interactions=warehouse.dataset(raw_table_path("interactions")),
    )  # fmt: skip

    assert not outcome.published
    (failure,) = outcome.failures
    assert failure.endswith(
        "60% of subjects have < 5 items: for subjects with 0-5 events (5 subjects, 100% short, "
        "mean list length 1.0); pool sizes unknown: no candidate_pools for this partition"
    )
    table = warehouse.read_json(f"{outcome.path}/validation.json")["validation"]["diagnosis"]
    for row in ("| 0 | 1 | 100% |", "| 1-2 | 2 | 100% |", "| 3-5 | 2 | 100% |"):
        assert row in table
    assert "| 6-10 | 2 | 50% | 0% | 5.5 |" in table
    assert "| 11+ | 3 | 0% | 0% | 10.0 |" in table
    assert "No candidate_pools for this partition" in table
    assert read_manifest(warehouse, SURFACE, REGION) is None
