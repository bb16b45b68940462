"""Send plans over lists the real `published_lists` asset published, on one real Dagster
instance: a campaign ending and a consent revoked between publish and send, a list expiring
a minute before its send, and re-runs of the partition that never send twice; then an open
through the HTTP API with its real tracking token, and a forged one refused."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from recsys_assets.channels.assets import send_plans
from recsys_assets.channels.ledger import read_sends
from recsys_assets.cli import main
from recsys_assets.config import load_settings
from recsys_assets.config.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.publish.assets import published_lists
from recsys_assets.serving.api import create_app
from recsys_assets.serving.service import RecommendationService
from recsys_assets.serving.state import naive_utc_ns
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.channels.conftest import record_event
from recsys_assets_tests.publish.builders import (
    NOW,
    make_items,
    make_slates,
    make_subjects,
    make_users,
    write_raw_snapshot,
)
from recsys_assets_tests.serving.conftest import TOKENS

EMAIL = SurfaceRegion(surface="email_daily", region="na")
TTL = "1259m"
"""20 h 59 min: a list published at NOW (12:00 UTC) expires at 08:59 UTC the next day."""
# make_subjects' timezones, and each one's 09:00 local send after NOW (2026-11-20 12:00 UTC)
CAMPAIGN_READER = 100  # New York: 14:00 UTC; item 1, a campaign ending at 13:00, opens the list
LATE_REVOKER = 101  # Berlin: 08:00 UTC on the 21st; revokes consent after publish
TOKYO = 102  # 00:00 UTC on the 21st
EXPIRES_FIRST = 103  # UTC: 09:00 on the 21st, a minute after the list expires
NEW_YORK = 104


def _config(tmp_path: Path) -> Path:
    """The packaged configuration with email_daily's ttl cut to TTL."""
    config = yaml.safe_load(Path(DEFAULT_CONFIG_PATH).read_text())
    config["surfaces"]["email_daily"]["ttl"] = TTL
    path = tmp_path / "surfaces.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _stage(warehouse: Warehouse, store_depth: int) -> None:
    """Raw users and items, and the partition's subjects and slates as the pipeline leaves
    them; item 1 is a campaign live at publish that ends before any send."""
    items = make_items(60, n_categories=30)  # 30 consecutive items: 30 categories
    items.loc[items["item_id"] == 1, ["is_sponsored", "campaign_id", "campaign_end"]] = [
        True,
        "campaign_noon",
        pd.Timestamp(NOW + timedelta(hours=1)),
    ]
    subjects = make_subjects(5, region=EMAIL.region)
    write_raw_snapshot(warehouse, users=make_users(subjects), items=items)
    _stage_pipeline(warehouse, subjects, items, store_depth)


def _stage_pipeline(
    warehouse: Warehouse,
    subjects: pd.DataFrame,
    items: pd.DataFrame,
    store_depth: int,
    score_time: datetime = NOW,
) -> None:
    """The pipeline's subjects and slates of the partition, scored at `score_time` (a list
    expires `ttl` after it)."""
    slates = make_slates(subjects, items, depth=store_depth, score_time=score_time)
    slates["is_sponsored"] = slates["item_id"].map(items.set_index("item_id")["is_sponsored"])
    warehouse.write_parquet(f"pipeline/subjects/{EMAIL.path}/part-00000.parquet", subjects)
    warehouse.write_parquet(f"pipeline/slates/{EMAIL.path}/part-00000.parquet", slates)


def _decisions(warehouse: Warehouse) -> pd.DataFrame:
    return warehouse.read_parquet(
        f"channels/send_plans/{EMAIL.path}/decision_log.parquet"
    ).set_index("subject_id")


def _send(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["send", "--surface", EMAIL.surface, "--region", EMAIL.region]) == 0
    return capsys.readouterr().out


def test_send_plans_over_really_published_lists_on_one_instance(
    local_warehouse: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse = local_warehouse
    config = _config(tmp_path)
    monkeypatch.setenv(CONFIG_ENV_VAR, str(config))  # `recsys send` reads the same file
    settings = load_settings(config)
    _stage(warehouse, settings.surface(EMAIL.surface).store_depth)

    def run(assets: list[dg.AssetsDefinition], at: datetime) -> dg.ExecuteInProcessResult:
        resource = RecsysResource(
            warehouse_url=warehouse.url, config_path=str(config), score_time=at.isoformat()
        )
        result = dg.materialize(
            assets, partition_key=EMAIL.to_key(), resources={"recsys": resource}, instance=instance
        )
        assert result.success
        return result

    with dg.instance_for_test() as instance:
        run([published_lists, send_plans], NOW)  # publish, then plan, in one run
        planned = _decisions(warehouse)
        assert planned["decision"].to_dict() == {
            CAMPAIGN_READER: "send",
            LATE_REVOKER: "send",
            TOKYO: "send",
            EXPIRES_FIRST: "skip",
            NEW_YORK: "send",
        }
        assert planned.loc[EXPIRES_FIRST, "reason"] == "stale_list"
        manifest = warehouse.read_json(f"published/{EMAIL.path}/manifest.json")
        lists = warehouse.read_parquet(f"{manifest['active_path']}/lists.parquet")
        expires_at = lists.loc[lists["subject_id"] == EXPIRES_FIRST, "expires_at"].iloc[0]
        scheduled = planned.loc[EXPIRES_FIRST, "scheduled_send_at"]
        assert scheduled - pd.Timestamp(expires_at) == pd.Timedelta(minutes=1)
        # the campaign was live at publish (item 1 opened the list), ended before the send
        first = lists[(lists["subject_id"] == CAMPAIGN_READER) & (lists["position"] == 1)]
        assert first["item_id"].tolist() == [1]
        assert planned.loc[CAMPAIGN_READER, "item_rejections"] == '{"campaign_ended": 1}'
        plan = warehouse.read_parquet(f"channels/send_plans/{EMAIL.path}/plan.parquet")
        opening = plan.set_index("subject_id").loc[CAMPAIGN_READER, "item_ids"].split("|")
        assert "1" not in opening and len(opening) == 6

        # consent revoked half an hour after publish: the next plan skips that subject
        record_event(
            warehouse, "consent_revoked", LATE_REVOKER, pd.Timestamp(NOW) + pd.Timedelta(minutes=30)
        )
        run([send_plans], NOW + timedelta(hours=1))
        assert _decisions(warehouse).loc[LATE_REVOKER, "reason"] == "consent_revoked"
        assert "sent 3" in _send(capsys)

        # the same plan again: every list already went out, nothing is sent
        run([send_plans], NOW + timedelta(hours=1))
        again = _decisions(warehouse)
        assert set(again.loc[[CAMPAIGN_READER, TOKYO, NEW_YORK], "reason"]) == {"already_sent"}
        assert "nothing planned" in _send(capsys)

        # the whole partition re-run two hours later, as the pipeline leaves it now (without
        # the revoked subject and the ended campaign): a new version, new list ids, but the
        # send cap holds the three sent; only the list that had expired goes out now
        subjects = make_subjects(5, region=EMAIL.region)
        items = make_items(60, n_categories=30)
        _stage_pipeline(
            warehouse,
            subjects[subjects["subject_id"] != LATE_REVOKER],
            items[items["item_id"] != 1],
            settings.surface(EMAIL.surface).store_depth,
            score_time=NOW + timedelta(hours=2),
        )
        run([published_lists, send_plans], NOW + timedelta(hours=2))
        rerun = _decisions(warehouse)
        assert set(rerun.loc[[CAMPAIGN_READER, TOKYO, NEW_YORK], "reason"]) == {"send_cap"}
        assert rerun.loc[EXPIRES_FIRST, "decision"] == "send"
        assert "sent 1" in _send(capsys)

    ledger = read_sends(warehouse, surface=EMAIL.surface, region=EMAIL.region)
    heads = ledger.drop_duplicates("send_key")
    assert sorted(heads["subject_id"]) == [CAMPAIGN_READER, TOKYO, EXPIRES_FIRST, NEW_YORK]
    outbox = f"channels/outbox/{EMAIL.path}"
    messages = [
        name for day in warehouse.list_dirs(outbox) for name in warehouse.list(f"{outbox}/{day}")
    ]
    assert len(messages) == 4  # one message per subject, whatever ran twice

    # an open with a real token from the message, through the HTTP API; a forged one refused
    token = str(ledger.loc[ledger["subject_id"] == TOKYO, "tracking_token"].iloc[0])
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    at_ns = naive_utc_ns(NOW + timedelta(hours=13))
    service = RecommendationService(warehouse, settings, clock=lambda: at_ns)
    with TestClient(create_app(service, tokens=TOKENS)) as client:
        opened = client.post("/v1/events", json={"type": "open", "tracking_token": token})
        refused = client.post("/v1/events", json={"type": "open", "tracking_token": forged})
    assert opened.status_code == 202 and opened.json()["accepted"] == 1
    assert refused.status_code == 404
