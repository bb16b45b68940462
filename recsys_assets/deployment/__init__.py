"""Deployments (local, Celery, Kubernetes) and the capacity plan: docs/SCALE.md."""

from recsys_assets.deployment.deployments import (
    DEPLOYMENT_ENV_VAR,
    DEPLOYMENTS,
    STEP_TAG,
    Deployment,
    DeploymentError,
    build_deployment,
    deployment_name,
)

__all__ = [
    "DEPLOYMENTS",
    "DEPLOYMENT_ENV_VAR",
    "STEP_TAG",
    "Deployment",
    "DeploymentError",
    "build_deployment",
    "deployment_name",
]
