"""Channel schedules: each requests send_plans for exactly the regions at their send hour."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from recsys_assets.channels.schedules import channel_schedules
from recsys_assets.config import load_settings
from recsys_assets.definitions import build_definitions
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.automation.conftest import recsys_for
from recsys_assets_tests.automation.helpers import NOW, write_users

SETTINGS = load_settings()


def _world(warehouse: Warehouse) -> None:
    """Users whose dominant timezone is New York (na), Berlin (eu), Tokyo (apac); latam's
    users are split, the most common zone (São Paulo) wins."""
    zones = {
        1: ("na", "America/New_York"),
        2: ("na", "America/New_York"),
        3: ("na", "America/Los_Angeles"),
        4: ("eu", "Europe/Berlin"),
        5: ("apac", "Asia/Tokyo"),
        6: ("latam", "America/Sao_Paulo"),
        7: ("latam", "America/Sao_Paulo"),
        8: ("latam", "America/Mexico_City"),
    }
    write_users(warehouse, {user: (region, NOW) for user, (region, _) in zones.items()})
    users = warehouse.read_parquet("raw/users/part-00000.parquet")
    users["timezone"] = users["user_id"].map({user: zone for user, (_, zone) in zones.items()})
    warehouse.write_parquet("raw/users/part-00000.parquet", users)


def _keys(surface: str, when: datetime, warehouse: Warehouse) -> list[str] | str:
    (schedule,) = [s for s in channel_schedules(SETTINGS) if s.name == f"{surface}_send_plans"]
    with dg.build_schedule_context(
        scheduled_execution_time=when.replace(tzinfo=UTC),
        resources={"recsys": recsys_for(warehouse)},
    ) as context:
        result = schedule(context)
    if isinstance(result, dg.SkipReason):
        return str(result.skip_message)
    return sorted(str(request.partition_key) for request in result)


def test_each_channel_schedule_requests_the_regions_at_their_send_hour(
    local_warehouse: Warehouse,
) -> None:
    _world(local_warehouse)
    # email_daily sends at 09:00 local. 14:00 UTC in November: 09:00 in New York (EST).
    assert _keys("email_daily", datetime(2026, 11, 20, 14), local_warehouse) == ["na|email_daily"]
    # 08:00 UTC: 09:00 in Berlin (CET); in July (CEST) the same 09:00 is 07:00 UTC.
    assert _keys("email_daily", datetime(2026, 11, 20, 8), local_warehouse) == ["eu|email_daily"]
    assert _keys("email_daily", datetime(2026, 7, 20, 7), local_warehouse) == ["eu|email_daily"]
    assert _keys("email_daily", datetime(2026, 7, 20, 8), local_warehouse) != ["eu|email_daily"]
    # 00:00 UTC: 09:00 in Tokyo; 12:00 UTC: 09:00 in São Paulo (UTC-3)
    assert _keys("email_daily", datetime(2026, 11, 20, 0), local_warehouse) == ["apac|email_daily"]
    assert _keys("email_daily", datetime(2026, 11, 20, 12), local_warehouse) == [
        "latam|email_daily"
    ]
    # digest_weekly at 10:00 local
    assert _keys("digest_weekly", datetime(2026, 11, 20, 9), local_warehouse) == [
        "eu|digest_weekly"
    ]
    # a tick where no region is at its send hour is skipped, saying why
    assert "no region of email_daily" in _keys(
        "email_daily", datetime(2026, 11, 20, 3), local_warehouse
    )
    # push has no send hour: every region, every hour
    assert _keys("push", datetime(2026, 11, 20, 3), local_warehouse) == sorted(
        f"{region}|push" for region in SETTINGS.surface_regions("push")
    )


def test_the_code_location_loads_with_one_schedule_per_channel() -> None:
    defs = build_definitions()
    for surface in ("email_daily", "push", "digest_weekly"):
        schedule = defs.resolve_schedule_def(f"{surface}_send_plans")
        assert schedule.job_name == "send_plans_job"
        assert surface in (schedule.description or "")
    job = defs.resolve_job_def("send_plans_job")
    assert job.partitions_def is not None
    assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == {"send_plans"}
