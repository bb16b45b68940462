"""RECSYS_DEPLOYMENT=k8s without a cluster: the Definitions load, the shipped run config
validates against them, step pods are sized by step tag, and the Helm values, the run config
and the Dockerfile agree with the code."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from recsys_assets.config import ConfigError, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, settings_from_mapping
from recsys_assets.definitions import build_definitions
from recsys_assets.deployment import (
    DEPLOYMENT_ENV_VAR,
    DEPLOYMENTS,
    STEP_TAG,
    DeploymentError,
    build_deployment,
)
from recsys_assets.deployment.deployments import (
    CELERY_BROKER_ENV_VAR,
    STEP_IO_FOLDER,
    per_op_pod_config,
)
from recsys_assets.pipeline.assets import PIPELINE_ASSETS
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse
from recsys_assets_tests.deployment.services import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _user_deployment() -> dict[str, Any]:
    (deployment,) = _yaml(K8S / "values.yaml")["dagster-user-deployments"]["deployments"]
    return deployment


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in deployment["env"]}


@pytest.fixture
def k8s_environment(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The code location's environment as values.yaml sets it."""
    environment = _env(_user_deployment())
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def _resolved_execution(job: dg.JobDefinition, run_config: dict[str, Any]) -> dict[str, Any]:
    return dg.validate_run_config(job, run_config)["execution"]["k8s"]


def test_k8s_definitions_validate_with_the_shipped_run_config(
    k8s_environment: dict[str, str],
) -> None:
    definitions = build_definitions()
    run_config = _yaml(K8S / "run_config.yaml")
    settings = load_settings()
    for job_name in (REFRESH_JOB, MODEL_JOB):
        job = definitions.resolve_job_def(job_name)
        assert job.executor_def.name == "k8s"
        execution = _resolved_execution(job, run_config)
        default = settings.deployment.k8s.step_resources["default"]
        requests = execution["step_k8s_config"]["container_config"]["resources"]["requests"]
        assert requests == {"cpu": default.cpu, "memory": default.memory}
    refresh = definitions.resolve_job_def(REFRESH_JOB)
    per_step = _resolved_execution(refresh, run_config)["per_step_k8s_config"]
    tagged = {
        op.name: op.tags[STEP_TAG]
        for op in refresh.graph.iterate_op_defs()
        if op.tags.get(STEP_TAG, "default") in settings.deployment.k8s.step_resources
        and op.tags.get(STEP_TAG, "default") != "default"
    }
    assert tagged, "the shard steps carry recsys/step tags"
    assert set(per_step) == set(tagged)
    for op_name, step in tagged.items():
        resources = settings.deployment.k8s.step_resources[step]
        requests = per_step[op_name]["container_config"]["resources"]["requests"]
        assert requests["cpu"] == resources.cpu and requests["memory"] == resources.memory
    # Steps hand outputs to each other through the S3 warehouse, not a pod's disk.
    io_manager = dg.validate_run_config(refresh, run_config)["resources"]["io_manager"]
    warehouse = k8s_environment[WAREHOUSE_ENV_VAR]
    assert io_manager["config"]["base_dir"] == f"{warehouse}/{STEP_IO_FOLDER}"


def test_only_scoring_steps_request_nvidia_gpus() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["deployment"]["k8s"]["step_resources"]["scoring"] = {
        "cpu": "4",
        "memory": "16Gi",
        "gpus": 1,
    }
    settings = settings_from_mapping(data)
    pods = per_op_pod_config(settings, PIPELINE_ASSETS)
    gpu = {
        op
        for op, pod in pods.items()
        if "nvidia.com/gpu" in pod["container_config"]["resources"]["requests"]
    }
    assert gpu == {"scored_candidates_shard"}
    resources = pods["scored_candidates_shard"]["container_config"]["resources"]
    assert resources["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == resources["requests"]
    assert {"candidate_pools_shard", "features_asof_shard", "slates_shard"} <= set(pods) - gpu


def test_a_step_resources_key_no_step_carries_is_refused() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["deployment"]["k8s"]["step_resources"]["scorng"] = {"cpu": "2"}
    with pytest.raises(DeploymentError, match=r"step_resources\.scorng: no step is tagged"):
        per_op_pod_config(settings_from_mapping(data), PIPELINE_ASSETS)


def test_helm_values_run_config_and_image_agree_with_the_code() -> None:
    values = _yaml(K8S / "values.yaml")
    deployment = _user_deployment()
    environment = _env(deployment)
    assert environment[DEPLOYMENT_ENV_VAR] == "k8s"
    warehouse = environment[WAREHOUSE_ENV_VAR]
    assert warehouse.startswith("s3://")
    run_config = _yaml(K8S / "run_config.yaml")
    assert run_config["resources"]["recsys"]["config"]["warehouse_url"] == warehouse

    arguments = deployment["dagsterApiGrpcArgs"]
    module = arguments[arguments.index("--module-name") + 1]
    location = arguments[arguments.index("--location-name") + 1]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert module == pyproject["tool"]["dagster"]["module_name"]
    assert location == pyproject["tool"]["dagster"]["code_location_name"]
    assert hasattr(importlib.import_module(module), "defs")
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is True

    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    assert "torch==2.13.0" in dockerfile
    assert '".[deploy]"' in dockerfile
    assert re.search(rf'"--module-name", "{re.escape(module)}"', dockerfile)
    assert f"EXPOSE {deployment['port']}" in dockerfile


def test_k8s_needs_an_s3_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEPLOYMENT_ENV_VAR, "k8s")
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, tmp_path.as_uri())
    with pytest.raises(DeploymentError, match=r"set RECSYS_WAREHOUSE_URL=s3://bucket/prefix"):
        build_definitions()


def test_celery_needs_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEPLOYMENT_ENV_VAR, "celery")
    monkeypatch.delenv(CELERY_BROKER_ENV_VAR, raising=False)
    with pytest.raises(DeploymentError, match=CELERY_BROKER_ENV_VAR):
        build_definitions()


def test_a_celery_broker_that_is_not_a_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEPLOYMENT_ENV_VAR, "celery")
    monkeypatch.setenv(CELERY_BROKER_ENV_VAR, "not a url")
    with pytest.raises(DeploymentError, match=r"RECSYS_CELERY_BROKER='not a url' is not a URL"):
        build_definitions()


def test_an_unknown_deployment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEPLOYMENT_ENV_VAR, "k9s")
    with pytest.raises(DeploymentError, match=re.escape(f"use one of {list(DEPLOYMENTS)}")):
        build_definitions()


@pytest.mark.parametrize(
    ("step_resources", "message"),
    [
        ({"default": {"cpu": "two"}}, r"deployment\.k8s\.step_resources\.default\.cpu"),
        ({"default": {"gpus": -1}}, r"deployment\.k8s\.step_resources\.default\.gpus"),
        ({"shard": {"cpu": "2"}}, r"step_resources: a 'default' entry is required"),
    ],
)
def test_bad_step_resources_name_the_key(step_resources: dict[str, Any], message: str) -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
    data["deployment"]["k8s"]["step_resources"] = step_resources
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(data)


def test_steps_hand_outputs_to_each_other_through_the_s3_warehouse(
    s3_warehouse: Warehouse,
) -> None:
    deployment = build_deployment(
        "k8s",
        settings=load_settings(),
        warehouse=s3_warehouse,
        assets=PIPELINE_ASSETS,
        local_executor=dg.in_process_executor,
    )

    @dg.op
    def shard_ids() -> list[int]:
        return [0, 1, 2]

    @dg.op
    def shard_count(ids: list[int]) -> int:
        return len(ids)

    @dg.job(resource_defs=dict(deployment.resources))
    def hand_off() -> None:
        shard_count(shard_ids())

    with dg.instance_for_test() as instance:
        result = hand_off.execute_in_process(instance=instance)
    assert result.output_for_node("shard_count") == 3
    assert s3_warehouse.exists(f"{STEP_IO_FOLDER}/{result.run_id}/shard_ids/result")
