"""`recsys rollback`, `recsys manifest`, `recsys export` through their argparse registration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from recsys_assets.config import ConfigError
from recsys_assets.publish import RollbackRefused, publish_version, read_manifest
from recsys_assets.publish.commands import EXPORT_COLUMNS, register
from recsys_assets.publish.versions import utc_now
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import REGION, SURFACE, make_lists, settings

PARTITION = ("--surface", SURFACE, "--region", REGION)


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recsys")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def _publish_fresh(warehouse: Warehouse) -> str:
    """Lists scored just now: the commands run on the wall clock."""
    lists, items, subjects = make_lists(score_time=utc_now())
    outcome = publish_version(
        warehouse, settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
        tracking_secret="t",
    )  # fmt: skip
    assert outcome.published, outcome.failures
    return outcome.version


def test_manifest_and_export(
    local_warehouse: Warehouse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_fresh(local_warehouse)
    second = _publish_fresh(local_warehouse)

    assert _run("manifest", *PARTITION) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["active_version"] == second
    assert [entry["status"] for entry in printed["history"]] == ["active", "previous"]

    for name in ("lists.parquet", "nested/lists.csv"):
        assert _run("export", *PARTITION, "--out", str(tmp_path / name)) == 0
    parquet = pd.read_parquet(tmp_path / "lists.parquet")
    assert list(parquet.columns) == EXPORT_COLUMNS
    assert len(parquet) == 50
    assert parquet["list_id"].str.endswith(second).all()
    assert len(pd.read_csv(tmp_path / "nested/lists.csv")) == 50
    with pytest.raises(ValueError, match=r"unsupported extension '\.xlsx'"):
        _run("export", *PARTITION, "--out", str(tmp_path / "lists.xlsx"))
    with pytest.raises(FileNotFoundError, match="nothing is published for surface=push region=eu"):
        _run("manifest", "--surface", SURFACE, "--region", "eu")
    with pytest.raises(ConfigError, match="unknown surface 'pager'"):
        _run("manifest", "--surface", "pager", "--region", REGION)


def test_rollback_command(local_warehouse: Warehouse, capsys: pytest.CaptureFixture[str]) -> None:
    first = _publish_fresh(local_warehouse)
    second = _publish_fresh(local_warehouse)

    assert _run("rollback", *PARTITION, "--reason", "ctr dropped") == 0
    assert f"active version {first} (was {second}" in capsys.readouterr().out
    manifest = read_manifest(local_warehouse, SURFACE, REGION)
    assert manifest.active_version == first
    assert manifest.entry(second).status == "rolled_back"
    assert "ctr dropped" in manifest.entry(second).reason
    with pytest.raises(RollbackRefused, match="marked rolled_back"):
        _run("rollback", *PARTITION, "--to", second)
