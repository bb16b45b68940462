"""Shared fixtures: a real S3 API (moto's server on a free loopback port) and warehouses."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data.seed import seed_warehouse
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def tracking_secret() -> Iterator[str]:
    """Publishing email/push lists requires a tracking-token secret; tests use this one.

    Session-wide, so session- and module-scoped fixtures that run the pipeline have it too.
    """
    secret = "test-only-tracking-secret"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRACKING_SECRET_ENV_VAR, secret)
        yield secret


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server, started once per test session; yields its endpoint URL."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in (*_S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_warehouse(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    """A warehouse in a fresh bucket on the moto server, also selected via the env var."""
    bucket = f"recsys-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/warehouse"
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, url)
    return Warehouse(url)


@pytest.fixture
def local_warehouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Warehouse:
    """A warehouse in a temp folder, also selected via the env var."""
    url = (tmp_path / "warehouse").as_uri()
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, url)
    return Warehouse(url)


@pytest.fixture(params=["local", "s3"])
def warehouse(request: pytest.FixtureRequest) -> Warehouse:
    """Both kinds of warehouse: a test using this runs against each."""
    return request.getfixturevalue(f"{request.param}_warehouse")


TINY_AS_OF = datetime(2026, 11, 20)
"""The fixed 'now' of the tiny seeded data: tests that score or serve use it as the clock."""
TINY_SEED = 1


@pytest.fixture(scope="session")
def tiny_raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `raw/` folder of tiny seeded data (seed 1, as of 2026-11-20), generated once."""
    root = tmp_path_factory.mktemp("tiny_seed")
    seed_warehouse(
        Warehouse(root.as_uri()),
        scale="tiny",
        seed=TINY_SEED,
        settings=load_settings(DEFAULT_CONFIG_PATH),
        as_of=TINY_AS_OF,
    )
    return root / "raw"


@pytest.fixture(scope="session")
def tiny_trained_root(tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny raw tables and a model bundle trained on them by the model_bundle asset, once
    per session (per test worker): read-only, tests copy it before running on it."""
    import dagster as dg

    from recsys_assets.definitions import build_definitions
    from recsys_assets.pipeline.jobs import MODEL_JOB
    from recsys_assets.pipeline.resources import RecsysResource

    root = tmp_path_factory.mktemp("tiny_trained")
    shutil.copytree(tiny_raw_root, root / "raw")
    definitions = build_definitions(
        RecsysResource(warehouse_url=root.as_uri(), score_time=TINY_AS_OF.isoformat())
    )
    with dg.instance_for_test() as instance:
        assert definitions.resolve_job_def(MODEL_JOB).execute_in_process(instance=instance).success
    return root


@pytest.fixture
def tiny_warehouse(
    tiny_raw_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Warehouse:
    """A fresh local warehouse holding a copy of the tiny seeded raw tables (no reseeding)."""
    root = tmp_path / "tiny_warehouse"
    shutil.copytree(tiny_raw_root, root / "raw")
    url = root.as_uri()
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, url)
    return Warehouse(url)
