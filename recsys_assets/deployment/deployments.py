"""Where steps run, picked in one place by `RECSYS_DEPLOYMENT` (local, celery or k8s).

Like Dagster's `project_fully_featured`, the deployment name selects the executor and the
IO manager; the assets, jobs and configuration stay the same everywhere. `local` keeps the
executors `pipeline/jobs.py` gives each job; `celery` and `k8s` hand every job's steps to
workers on other processes or machines, so what steps pass each other must live where all
of them can read it: the warehouse.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,  # what define_asset_job returns; not exported by dagster
)

from recsys_assets.config import Settings
from recsys_assets.config.settings import StepResourcesConfig
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse

DEPLOYMENT_ENV_VAR = "RECSYS_DEPLOYMENT"
CELERY_BROKER_ENV_VAR = "RECSYS_CELERY_BROKER"
CELERY_BACKEND_ENV_VAR = "RECSYS_CELERY_BACKEND"
"""Celery's result backend; the broker's URL when unset (a Redis broker serves both)."""
STEP_TAG = "recsys/step"
"""Op tag naming a step's kind (`scoring`, …): k8s sizes the step's pod by it."""
STEP_IO_FOLDER = "dagster_io"
"""Warehouse folder where celery and k8s steps hand outputs to each other."""

Job = UnresolvedAssetJobDefinition | dg.JobDefinition
DeploymentName = Literal["local", "celery", "k8s"]
DEPLOYMENTS: tuple[DeploymentName, ...] = get_args(DeploymentName)


class DeploymentError(ValueError):
    """The environment does not describe a deployment that can run: the message names the
    variable and what to set."""


@dataclass(frozen=True)
class Deployment:
    """The executor and resources one deployment adds to the code location."""

    name: DeploymentName
    executor: dg.ExecutorDefinition
    resources: Mapping[str, Any]
    replaces_job_executors: bool
    """True: every job runs on `executor`, whatever `pipeline/jobs.py` chose for it."""

    def apply_to_jobs(self, jobs: Sequence[Job]) -> list[Job]:
        """`jobs`, the asset jobs on this deployment's executor where it replaces theirs (op
        jobs without an executor of their own take the code location's, this one too)."""
        if not self.replaces_job_executors:
            return list(jobs)
        return [
            _with_executor(job, self.executor)
            if isinstance(job, UnresolvedAssetJobDefinition)
            else job
            for job in jobs
        ]


def _with_executor(
    job: UnresolvedAssetJobDefinition, executor: dg.ExecutorDefinition
) -> UnresolvedAssetJobDefinition:
    """`job` as pipeline/jobs.py defines it (selection, tags, retry policy, partitions, …)
    on `executor`: its fields are exactly `define_asset_job`'s parameters."""
    fields = {name: getattr(job, name) for name in job._fields}
    return dg.define_asset_job(**{**fields, "executor_def": executor})


def deployment_name(environ: Mapping[str, str] = os.environ) -> DeploymentName:
    """`RECSYS_DEPLOYMENT` (default `local`), or a DeploymentError listing the known names."""
    value = environ.get(DEPLOYMENT_ENV_VAR, "").strip() or "local"
    if value not in DEPLOYMENTS:
        raise DeploymentError(
            f"{DEPLOYMENT_ENV_VAR}={value!r} is not a deployment; use one of {list(DEPLOYMENTS)}"
        )
    return cast(DeploymentName, value)


def build_deployment(
    name: DeploymentName,
    *,
    settings: Settings,
    warehouse: Warehouse,
    assets: Iterable[object],
    local_executor: dg.ExecutorDefinition,
    environ: Mapping[str, str] = os.environ,
) -> Deployment:
    """The deployment called `name`; `assets` are scanned for `recsys/step` tags (k8s)."""
    if name == "local":
        return Deployment("local", local_executor, {}, replaces_job_executors=False)
    step_io = {"io_manager": dg.FilesystemIOManager(base_dir=warehouse.uri(STEP_IO_FOLDER))}
    if name == "celery":
        return Deployment("celery", celery_executor(environ), step_io, replaces_job_executors=True)
    if warehouse.is_local:
        raise DeploymentError(
            f"{DEPLOYMENT_ENV_VAR}=k8s needs a warehouse every pod can reach: set "
            f"{WAREHOUSE_ENV_VAR}=s3://bucket/prefix (it is {warehouse.url})"
        )
    return Deployment("k8s", k8s_executor(settings, assets), step_io, replaces_job_executors=True)


def celery_executor(environ: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """dagster-celery's executor on the broker in `RECSYS_CELERY_BROKER`.

    The URLs stay environment references in the run config (they may hold a password); the
    workers read the same variables (`recsys_assets.deployment.celery_worker`).
    """
    from dagster_celery import celery_executor as dagster_celery_executor

    if not environ.get(CELERY_BROKER_ENV_VAR):
        raise DeploymentError(
            f"{DEPLOYMENT_ENV_VAR}=celery needs {CELERY_BROKER_ENV_VAR}, the broker's URL "
            "(e.g. redis://redis-host:6379/0)"
        )
    for variable in (CELERY_BROKER_ENV_VAR, CELERY_BACKEND_ENV_VAR):
        value = environ.get(variable)
        if value and not urlsplit(value).scheme:
            # Otherwise the mistake surfaces only when a run launches, in a worker's log.
            raise DeploymentError(
                f"{variable}={value!r} is not a URL: give scheme://host, e.g. "
                "redis://redis-host:6379/0"
            )
    backend = (
        CELERY_BACKEND_ENV_VAR if environ.get(CELERY_BACKEND_ENV_VAR) else CELERY_BROKER_ENV_VAR
    )
    return dagster_celery_executor.configured(
        {"broker": {"env": CELERY_BROKER_ENV_VAR}, "backend": {"env": backend}}, name="celery"
    )


def k8s_executor(settings: Settings, assets: Iterable[object]) -> dg.ExecutorDefinition:
    """dagster-k8s's `k8s_job_executor`: one pod per step, sized by the step's tag."""
    from dagster_k8s import k8s_job_executor

    k8s = settings.deployment.k8s
    config: dict[str, Any] = {
        "step_k8s_config": pod_config(k8s.step_resources["default"]),
        "per_step_k8s_config": per_op_pod_config(settings, assets),
    }
    if k8s.max_concurrent_steps:
        config["max_concurrent"] = k8s.max_concurrent_steps
    return k8s_job_executor.configured(config, name="k8s")


def pod_config(resources: StepResourcesConfig) -> dict[str, Any]:
    """The `dagster-k8s/config` block for a step pod with these resources (requests =
    limits, so a step gets what the plan counts on; GPUs go in as `nvidia.com/gpu`)."""
    amounts: dict[str, str] = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpus:
        amounts["nvidia.com/gpu"] = str(resources.gpus)
    return {"container_config": {"resources": {"requests": amounts, "limits": dict(amounts)}}}


def per_op_pod_config(settings: Settings, assets: Iterable[object]) -> dict[str, dict[str, Any]]:
    """Op name → pod config for every op whose `recsys/step` tag has its own entry in
    `deployment.k8s.step_resources` (the others run with `default`). An entry no op's tag
    names is a typo or a stale key: a DeploymentError says which."""
    step_resources = settings.deployment.k8s.step_resources
    ops = _ops(assets)
    tags_in_use = {op.tags[STEP_TAG] for op in ops if STEP_TAG in op.tags}
    unused = sorted(set(step_resources) - tags_in_use - {"default"})
    if unused:
        raise DeploymentError(
            f"deployment.k8s.step_resources.{unused[0]}: no step is tagged "
            f"{STEP_TAG}={unused[0]!r}; tags in use: {sorted(tags_in_use)} (or 'default')"
        )
    return {
        op.name: pod_config(step_resources[op.tags[STEP_TAG]])
        for op in ops
        if op.tags.get(STEP_TAG, "default") != "default" and op.tags[STEP_TAG] in step_resources
    }


def _ops(assets: Iterable[object]) -> list[dg.OpDefinition]:
    ops: list[dg.OpDefinition] = []
    for asset in assets:
        if not isinstance(asset, dg.AssetsDefinition) or asset.computation is None:
            continue
        node = asset.node_def
        if isinstance(node, dg.GraphDefinition):
            ops.extend(node.iterate_op_defs())
        elif isinstance(node, dg.OpDefinition):
            ops.append(node)
    return ops
