"""Backfill partition selection: one region across surfaces, as `dagster job backfill` takes it."""

from __future__ import annotations

import pytest

from recsys_assets.automation.backfills import backfill_partitions, partitions_argument
from recsys_assets.config import ConfigError, load_settings
from recsys_assets.pipeline.partitions import surface_region_partitions

SETTINGS = load_settings()


def test_one_region_across_surfaces_names_existing_contiguous_keys() -> None:
    argument = partitions_argument(backfill_partitions(SETTINGS, regions=["eu"]))
    keys = argument.split(",")
    assert keys == [f"eu|{surface}" for surface in SETTINGS.surfaces]
    every = surface_region_partitions(SETTINGS).get_partition_keys()
    start = every.index(keys[0])
    assert every[start : start + len(keys)] == keys, "--from/--to must select exactly them"


def test_unknown_region_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="configured regions"):
        backfill_partitions(SETTINGS, regions=["mars"])
