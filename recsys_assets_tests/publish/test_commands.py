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
from recsys_assets.publish.versions import manifest_path, utc_now
from recsys_assets.rules.tombstones import write_tombstones
from recsys_assets.serving.state import OnlineState, ServingEvent
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import (
    REGION,
    SURFACE,
    make_lists,
    make_users,
    settings,
    write_raw_snapshot,
)

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


def test_export_withholds_the_lists_of_people_who_may_not_get_the_surface_now(
    local_warehouse: Warehouse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Published while everyone consented; since then one person's raw consent went off,
    one turned push off, one revoked through serving's events API and one through a policy
    change. Only the fifth list is exported."""
    _publish_fresh(local_warehouse)
    _, items, subjects = make_lists()
    users = make_users(subjects).set_index("user_id")
    users.loc[100, "consent_personalization"] = False
    users.loc[101, "push_enabled"] = False
    write_raw_snapshot(local_warehouse, users=users.reset_index(), items=items)
    OnlineState(local_warehouse, settings()).record([ServingEvent("consent_revoked", user_id=102)])
    write_tombstones(local_warehouse, "gdpr-103", [{"type": "consent_revoked", "user_id": 103}])
    capsys.readouterr()

    assert _run("export", *PARTITION, "--out", str(tmp_path / "lists.csv")) == 0
    exported = pd.read_csv(tmp_path / "lists.csv")
    assert set(exported["subject_id"]) == {104}
    assert len(exported) == settings().surface(SURFACE).store_depth
    printed = capsys.readouterr().out
    assert "withheld 4 list(s) of people who may not get push now" in printed
    assert "(raw users, consent events, policy changes)" in printed


def test_export_without_raw_users_still_honours_consent_events(
    local_warehouse: Warehouse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_fresh(local_warehouse)
    OnlineState(local_warehouse, settings()).record([ServingEvent("consent_revoked", user_id=100)])
    capsys.readouterr()

    assert _run("export", *PARTITION, "--out", str(tmp_path / "lists.parquet")) == 0
    assert 100 not in set(pd.read_parquet(tmp_path / "lists.parquet")["subject_id"])
    printed = capsys.readouterr().out
    assert "withheld 1 list(s)" in printed
    assert "raw consent not checked: no raw users table" in printed


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


def test_rollback_to_an_unreadable_version_is_refused_and_changes_nothing(
    local_warehouse: Warehouse,
) -> None:
    """Regression: the flip went through, the good version was marked rolled_back, and
    serving was left with lists it could not read."""
    first = _publish_fresh(local_warehouse)
    second = _publish_fresh(local_warehouse)
    path = manifest_path(SURFACE, REGION)
    before = local_warehouse.read_bytes(path)
    lists = f"{read_manifest(local_warehouse, SURFACE, REGION).entry(first).path}/lists.parquet"
    local_warehouse.write_bytes(lists, b"PAR1 not really parquet")

    with pytest.raises(RollbackRefused, match=f"{first}.*unreadable lists.parquet"):
        _run("rollback", *PARTITION, "--to", first)
    assert local_warehouse.read_bytes(path) == before
    assert read_manifest(local_warehouse, SURFACE, REGION).active_version == second


def test_a_version_rolled_back_by_mistake_can_be_reactivated_with_force(
    local_warehouse: Warehouse, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _publish_fresh(local_warehouse)
    second = _publish_fresh(local_warehouse)
    assert _run("rollback", *PARTITION) == 0

    with pytest.raises(RollbackRefused, match="--force --reason"):
        _run("rollback", *PARTITION, "--to", second)
    with pytest.raises(RollbackRefused, match="without --to VERSION and a --reason"):
        _run("rollback", *PARTITION, "--to", second, "--force")
    assert _run("rollback", *PARTITION, "--to", second, "--force", "--reason", "wrong one") == 0
    manifest = read_manifest(local_warehouse, SURFACE, REGION)
    assert manifest.active_version == second
    assert manifest.entry(second).reason == f"rolled back from {first} (forced): wrong one"
    assert manifest.entry(first).status == "rolled_back"
    assert f"active version {second}" in capsys.readouterr().out
