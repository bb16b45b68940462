"""The refresh job as a code location process rebuilds it: `dg.reconstructable` needs a
module-level function, and Celery workers import this module to run the job's steps."""

from __future__ import annotations

import dagster as dg

from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.jobs import REFRESH_JOB


def refresh_lists_job() -> dg.JobDefinition:
    """`refresh_lists` of the code location the environment describes (RECSYS_DEPLOYMENT,
    RECSYS_WAREHOUSE_URL, …), as every process of a deployment builds it."""
    return build_definitions().resolve_job_def(REFRESH_JOB)
