"""The Dagster code location: every asset, check, job, sensor and schedule, and their resources."""

from __future__ import annotations

import warnings

import dagster as dg
from dagster_duckdb import DuckDBResource

from recsys_assets.automation.schedules import SCHEDULES
from recsys_assets.automation.sensors import SENSORS
from recsys_assets.deployment import build_deployment, deployment_name
from recsys_assets.evaluation.assets import evaluation
from recsys_assets.pipeline.jobs import (
    STEPS_IN_ONE_PROCESS,
    refresh_lists_job,
    train_model_bundle_job,
)
from recsys_assets.pipeline.partitions import bind_partitions
from recsys_assets.pipeline.resources import RecsysResource

# The partitioned assets pass `backfill_policy` to `@asset` (Beta in Dagster 1.13), their
# checks are partitioned (`partitions_def` on `AssetCheckSpec`, Preview) and the raw tables
# are a `multi_observable_source_asset` (Beta): all on purpose (docs/AUTOMATION.md,
# "Backfill policy" and "Asset checks"). Their notices fire once per decorated asset in every
# process that imports them (each code server, run worker and CLI call), so they are
# silenced here, where the code location imports them, and nowhere else.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    from recsys_assets.channels.assets import CHANNEL_ASSETS, CHANNEL_JOBS
    from recsys_assets.channels.delivery import deliver_send_plans, deliver_sends
    from recsys_assets.channels.schedules import channel_schedules
    from recsys_assets.data.assets import RAW_ASSETS, RAW_JOBS
    from recsys_assets.pipeline.assets import PIPELINE_ASSETS
    from recsys_assets.publish.assets import PUBLISH_ASSETS, PUBLISH_JOBS


def build_definitions(recsys: RecsysResource | None = None) -> dg.Definitions:
    """The code location for `recsys` (default: warehouse and configuration from the
    environment), with everything derived from the one `Settings` it reads.

    Partitions are bound here rather than at import, so a `recsys` pointed at another
    configuration file brings its own regions and surfaces, and a reloaded code location
    (a new code-server process) serves the configuration of that moment.
    """
    recsys = recsys or RecsysResource()
    settings = recsys.settings()
    assets = [
        *RAW_ASSETS,
        *bind_partitions([*PIPELINE_ASSETS, *PUBLISH_ASSETS, *CHANNEL_ASSETS], settings),
        evaluation,
    ]
    # RECSYS_DEPLOYMENT (local, celery, k8s) picks where steps run: docs/SCALE.md.
    deployment = build_deployment(
        deployment_name(),
        settings=settings,
        warehouse=recsys.warehouse(),
        assets=assets,
        local_executor=STEPS_IN_ONE_PROCESS,
    )
    return dg.Definitions(
        assets=assets,
        jobs=deployment.apply_to_jobs(
            [
                train_model_bundle_job,
                refresh_lists_job,
                *PUBLISH_JOBS,
                *RAW_JOBS,
                *CHANNEL_JOBS,
                deliver_sends,
            ]
        ),
        sensors=[*SENSORS, deliver_send_plans],
        schedules=[*SCHEDULES, *channel_schedules(settings)],
        resources={
            "recsys": recsys,
            # One in-memory database per connection: parallel steps never share a file.
            "duckdb": DuckDBResource(database=":memory:"),
            **deployment.resources,
        },
        # Also for runs outside the jobs: an asset backfill or a materialization from the UI.
        executor=deployment.executor,
    )


defs = build_definitions()
