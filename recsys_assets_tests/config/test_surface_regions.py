"""A surface's `regions`: which surface × region pairs have lists at all."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from recsys_assets.config import ConfigError, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, settings_from_mapping

TENANT_SURFACE = "enterprise_action_queue"


def _config(**surface_overrides: Any) -> dict[str, Any]:
    """The packaged configuration with keys of the tenant surface overridden."""
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["surfaces"][TENANT_SURFACE].update(surface_overrides)
    return config


def test_unknown_region_names_the_surface_and_the_region() -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping(_config(regions=["na", "mars"]))
    message = str(raised.value)
    assert f"surfaces.{TENANT_SURFACE}.regions: unknown region 'mars'" in message
    assert "configured regions: ['na', 'eu', 'apac', 'latam']" in message


def test_an_empty_region_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="lists no region"):
        settings_from_mapping(_config(regions=[]))


def test_without_the_key_a_surface_is_enabled_in_every_region() -> None:
    config = _config()
    del config["surfaces"][TENANT_SURFACE]["regions"]
    settings = settings_from_mapping(config)
    assert settings.surface_regions(TENANT_SURFACE) == settings.regions
    assert len(settings.enabled_partitions()) == len(settings.surfaces) * len(settings.regions)


def test_the_packaged_tenant_queue_runs_only_where_the_seed_has_tenants() -> None:
    # The seed places its three tenants in the first three regions: latam has no actor.
    settings = load_settings()
    assert settings.surface_regions(TENANT_SURFACE) == ("na", "eu", "apac")
    pairs = settings.enabled_partitions()
    assert (TENANT_SURFACE, "latam") not in pairs
    assert ("home_feed", "latam") in pairs
    assert len(pairs) == len(settings.surfaces) * len(settings.regions) - 1
    assert pairs[0] == ("home_feed", "na"), "region by region, surfaces in configured order"


def test_a_disabled_pair_is_refused_naming_the_config_key() -> None:
    settings = load_settings()
    settings.check_enabled(TENANT_SURFACE, "na")
    with pytest.raises(ConfigError) as raised:
        settings.check_enabled(TENANT_SURFACE, "latam")
    assert str(raised.value) == (
        f"surface {TENANT_SURFACE} is not enabled in region latam "
        f"(surfaces.{TENANT_SURFACE}.regions)"
    )
    assert not settings.is_enabled("no_such_surface", "na")
