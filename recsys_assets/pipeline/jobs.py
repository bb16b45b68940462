"""Jobs over the asset graph: the units that schedules, sensors and `recsys run` launch."""

from __future__ import annotations

import dagster as dg

MODEL_JOB = "train_model_bundle"
REFRESH_JOB = "refresh_lists"
STEPS_IN_ONE_PROCESS = dg.in_process_executor
"""Both jobs run their steps in one process. A partition's steps form a chain (subjects →
… → published_lists) that cannot overlap, so a process per step (Dagster's default) only
added an interpreter, torch and Dagster start-up to every step: 24–37 s per partition run
launched by the daemon against 1.5 s in one process. Partitions run in parallel as separate
runs, bounded by the run queue in dagster.yaml."""

train_model_bundle_job = dg.define_asset_job(
    MODEL_JOB,
    selection=dg.AssetSelection.assets("model_bundle"),
    description="Retrain the two-tower retrieval model and the calibrated ranker.",
    executor_def=STEPS_IN_ONE_PROCESS,
)

refresh_lists_job = dg.define_asset_job(
    REFRESH_JOB,
    selection=dg.AssetSelection.groups("pipeline", "publish"),
    description="Recompute one surface × region partition end to end, from subjects to the "
    "published lists, with the current model bundle.",
    executor_def=STEPS_IN_ONE_PROCESS,
)
