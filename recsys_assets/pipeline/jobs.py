"""Jobs over the asset graph: the units that schedules, sensors and `recsys run` launch."""

from __future__ import annotations

import dagster as dg

MODEL_JOB = "train_model_bundle"
REFRESH_JOB = "refresh_lists"

train_model_bundle_job = dg.define_asset_job(
    MODEL_JOB,
    selection=dg.AssetSelection.assets("model_bundle"),
    description="Retrain the two-tower retrieval model and the calibrated ranker.",
)

refresh_lists_job = dg.define_asset_job(
    REFRESH_JOB,
    selection=dg.AssetSelection.groups("pipeline", "publish"),
    description="Recompute one surface × region partition end to end, from subjects to the "
    "published lists, with the current model bundle.",
)
