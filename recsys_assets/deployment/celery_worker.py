"""The Celery app that `RECSYS_DEPLOYMENT=celery` workers run.

    celery -A recsys_assets.deployment.celery_worker worker --concurrency 1 --prefetch-multiplier 1

It is dagster-celery's app (`dagster_celery.app`) on the broker and result backend the
executor uses, read from the same environment variables, so workers and runs cannot
disagree about where the tasks go. Workers need the code location's environment too
(`RECSYS_WAREHOUSE_URL`, `RECSYS_CONFIG`, secrets): they rebuild the job to run its steps.
"""

from __future__ import annotations

import os

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from recsys_assets.deployment.deployments import (
    CELERY_BACKEND_ENV_VAR,
    CELERY_BROKER_ENV_VAR,
    DeploymentError,
)

_broker = os.environ.get(CELERY_BROKER_ENV_VAR)
if not _broker:
    raise DeploymentError(
        f"a Celery worker needs {CELERY_BROKER_ENV_VAR}, the broker's URL "
        "(e.g. redis://redis-host:6379/0), the same as the runs'"
    )

app = make_app(
    CeleryExecutor.for_cli(
        broker=_broker, backend=os.environ.get(CELERY_BACKEND_ENV_VAR) or _broker
    ).app_args()
)
execute_plan = create_task(app)
