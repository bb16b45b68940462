"""Configuration: surfaces, regions, thresholds. One file, validated at load."""

from recsys_assets.config.settings import (
    ConfigError,
    Settings,
    SurfaceConfig,
    load_settings,
    parse_duration,
)

__all__ = ["ConfigError", "Settings", "SurfaceConfig", "load_settings", "parse_duration"]
