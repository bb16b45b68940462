"""Shared fixtures: a real S3 API (moto's server on a free loopback port) and warehouses."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

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
