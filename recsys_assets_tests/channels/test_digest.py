"""The weekly digest: localized template text over the plan row's items only, its template
version on the plan, the decision log and the message."""

from __future__ import annotations

from datetime import timedelta
from email import message_from_bytes, policy

import pytest

from recsys_assets.channels.digest import DIGEST_TEMPLATE_VERSION, template_locale
from recsys_assets.channels.plans import SEND, plan_sends, write_send_plan
from recsys_assets.cli import main
from recsys_assets.data.snapshot import read_raw
from recsys_assets_tests.channels.conftest import REGION, ChannelWorld, publish_channel_version
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.conftest import CONSUMER

OUTBOX = f"channels/outbox/surface=digest_weekly/region={REGION}/date=2026-11-20"


def test_template_locale_falls_back_to_english() -> None:
    assert [template_locale(x) for x in ("de-AT", "fr_CA", "pt-BR", None)] == [
        "de",
        "fr",
        "en",
        "en",
    ]


def test_digest_names_only_items_that_passed_the_final_check_in_the_users_language(
    channel: ChannelWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    warehouse = channel.warehouse
    good = channel.base.good
    users = read_raw(warehouse, "users")
    users.loc[users["user_id"] == CONSUMER, "locale"] = "de-DE"
    warehouse.write_parquet("raw/users/part-00000.parquet", users)
    items = read_raw(warehouse, "items")
    listed = [channel.campaign_item, *good[:4]]
    items["title"] = items["item_id"].map(lambda item: f"Title-{item}")
    items.loc[items["item_id"] == channel.campaign_item, "title"] = "Campaign ended before send"
    warehouse.write_parquet("raw/items/part-00000.parquet", items)
    publish_channel_version(
        channel,
        "digest_weekly",
        {CONSUMER: listed},
        ttl=timedelta(days=7),
        calibrated={CONSUMER: [0.95, 0.9, 0.8, 0.7, 0.6]},
    )

    plan = plan_sends(warehouse, channel.base.settings, "digest_weekly", REGION, now=TINY_AS_OF)
    write_send_plan(warehouse, plan)

    (decision,) = plan.decisions.itertuples(index=False)
    assert (decision.decision, decision.template_version) == (SEND, DIGEST_TEMPLATE_VERSION)
    (row,) = plan.plan.itertuples(index=False)
    assert (row.locale, row.template_version) == ("de-DE", DIGEST_TEMPLATE_VERSION)
    # the campaign ended at 02:00, before the 10:00 send: the final check dropped it
    assert str(channel.campaign_item) not in row.item_ids.split("|")

    assert main(["send", "--surface", "digest_weekly", "--region", REGION]) == 0
    capsys.readouterr()
    raw = warehouse.read_bytes(f"{OUTBOX}/{CONSUMER}.eml")
    message = message_from_bytes(raw, policy=policy.default)
    text = message.get_content()
    assert message["X-Recsys-Template-Version"] == DIGEST_TEMPLATE_VERSION
    assert message["Subject"] == "Ihre Woche: 4 Empfehlungen"
    assert "diese Woche für Sie ausgewählt" in text
    for item in good[:4]:
        assert f"Title-{item}" in text
    assert "Campaign ended" not in text  # the dropped item's title
