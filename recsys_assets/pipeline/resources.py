"""The one resource every asset uses: which warehouse, which configuration, what time it is."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from recsys_assets.config import Settings, load_settings
from recsys_assets.warehouse import Warehouse


class RecsysResource(dg.ConfigurableResource):
    """Warehouse, settings and the pipeline clock, picked per deployment in one place.

    Leave `warehouse_url` and `config_path` empty to use RECSYS_WAREHOUSE_URL and
    RECSYS_CONFIG (or their defaults). `score_time` pins the clock (ISO 8601, UTC) for
    reproducible runs and backfills; empty means "now".
    """

    warehouse_url: str = ""
    config_path: str = ""
    score_time: str = ""

    def warehouse(self) -> Warehouse:
        return Warehouse(self.warehouse_url) if self.warehouse_url else Warehouse.from_env()

    def settings(self) -> Settings:
        return load_settings(self.config_path or None)

    def now(self) -> pd.Timestamp:
        """Naive UTC score time, at microsecond precision so it survives Parquet."""
        stamp = pd.Timestamp(self.score_time) if self.score_time else pd.Timestamp.now("UTC")
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC").tz_localize(None)
        return stamp.floor("us")
