"""`recsys run` / `demo` partition selection honours each surface's `regions`."""

from __future__ import annotations

import pytest

from recsys_assets.config import ConfigError, load_settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.runner import select_partitions

SETTINGS = load_settings()
TENANT_SURFACE = "enterprise_action_queue"


def test_default_selection_skips_disabled_pairs() -> None:
    chosen = select_partitions(SETTINGS, None, None)
    assert SurfaceRegion(TENANT_SURFACE, "latam") not in chosen
    assert chosen == [SurfaceRegion(s, r) for s, r in SETTINGS.enabled_partitions()]


def test_a_region_runs_only_its_enabled_surfaces() -> None:
    chosen = select_partitions(SETTINGS, None, ["latam"])
    assert chosen == [SurfaceRegion(s, "latam") for s in SETTINGS.surfaces if s != TENANT_SURFACE]


def test_a_surface_runs_only_in_its_regions() -> None:
    chosen = select_partitions(SETTINGS, [TENANT_SURFACE], ["na", "latam"])
    assert chosen == [SurfaceRegion(TENANT_SURFACE, "na")]


def test_naming_only_a_disabled_pair_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=rf"\(surfaces\.{TENANT_SURFACE}\.regions\)$"):
        select_partitions(SETTINGS, [TENANT_SURFACE], ["latam"])


def test_unknown_names_are_still_refused() -> None:
    with pytest.raises(ConfigError, match="configured regions"):
        select_partitions(SETTINGS, None, ["mars"])
