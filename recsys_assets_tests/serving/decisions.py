"""Reading the serving decision log back in tests: every day's files, in time order."""

from __future__ import annotations

import pandas as pd

from recsys_assets.serving.decision_log import DECISION_LOG_PREFIX
from recsys_assets.warehouse import Warehouse


def read_decision_log(warehouse: Warehouse) -> pd.DataFrame:
    days = warehouse.list_dirs(DECISION_LOG_PREFIX)
    frames = [warehouse.read_parquet(f"{DECISION_LOG_PREFIX}/{day}") for day in days]
    return pd.concat(frames, ignore_index=True).sort_values("ts", kind="stable")
