"""A small serving world on the tiny seeded warehouse: items set up to fail each rule,
known subjects, a fixed clock, and settings with a fast manifest poll."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pandas as pd
import pytest

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, ChannelRulesConfig, ServingConfig
from recsys_assets.data.snapshot import read_raw
from recsys_assets.serving.auth import ApiTokens
from recsys_assets.serving.decision_log import DecisionLog
from recsys_assets.serving.service import RecommendationService
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF
from recsys_assets_tests.serving.published import write_version

CONSUMER = 900_001
NO_CONSENT = 900_002
AGENT = 900_003
TENANT = "tenant_acme"
OTHER_TENANT = "tenant_globex"
HIDDEN_CREATOR = "creator_hidden_by_test"
HIDDEN_CATEGORY = "category_hidden_by_test"
WRITER = "writer-token"
READER = "reader-token"
ADMIN_TOKEN = "admin-token"
TOKENS = ApiTokens.parse(
    f"{WRITER}:events:write+recommendations:read,{READER}:recommendations:read,{ADMIN_TOKEN}:admin"
)


class Clock:
    """A settable clock in naive-UTC nanoseconds."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> int:
        return int(pd.Timestamp(self.now).value)

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class World:
    warehouse: Warehouse
    settings: Settings
    clock: Clock
    good: list[int]
    failing: dict[str, int] = field(default_factory=dict)
    services: list[RecommendationService] = field(default_factory=list)

    def service(self, *, start: bool = False) -> RecommendationService:
        service = RecommendationService(
            self.warehouse,
            self.settings,
            clock=self.clock,
            decision_log=DecisionLog(self.warehouse, flush_interval_s=0.2),
            poll_interval_s=0.05,
        )
        if start:
            service.start()
        else:
            service.load()
        self.services.append(service)
        return service

    def publish_consumer_list(self, items: int) -> None:
        """An active home_feed × na version, an hour old (6 h TTL): CONSUMER's list of the
        first `items` good items."""
        write_version(
            self.warehouse,
            "home_feed",
            "na",
            {CONSUMER: self.good[:items]},
            generated_at=self.clock.now - timedelta(hours=1),
            ttl=timedelta(hours=6),
        )


def _serving_settings() -> Settings:
    settings = load_settings(DEFAULT_CONFIG_PATH)
    home = settings.surfaces["home_feed"].model_copy(
        update={"channel_rules": ChannelRulesConfig(frequency_cap_per_day=2)}
    )
    return settings.model_copy(
        update={
            "surfaces": {**settings.surfaces, "home_feed": home},
            "serving": ServingConfig(manifest_poll_interval_s=0.05),
        }
    )


@pytest.fixture
def world(tiny_warehouse: Warehouse) -> Iterator[World]:
    """Tiny raw data with one item made to fail each item rule and three test subjects."""
    warehouse = tiny_warehouse
    items = read_raw(warehouse, "items")
    plain = (
        (items["status"] == "active")
        & (items["policy_state"] == "approved")
        & (items["regions"] == "*")
        & (items["stock"] != 0)
        & ~items["is_sponsored"]
        & items["tenant_id"].isna()
        & items["required_role"].isna()
        & items["case_state"].isna()
    )
    ids = items.loc[plain, "item_id"].astype(int).tolist()
    assert len(ids) >= 60, "tiny seed changed: not enough plain items for the serving tests"
    at = items.set_index("item_id")
    failing = dict(
        zip(
            [
                "inactive_or_deleted",
                "not_approved",
                "not_in_region",
                "out_of_stock",
                "campaign_ended",
                "tenant_not_allowed",
                "tombstoned",
                "hidden_item",
                "hidden_creator",
                "hidden_category",
                "already_consumed",
                "frequency_cap",
                "role_not_allowed",
                "case_closed",
                "own_tenant",
            ],
            ids[:15],
            strict=True,
        )
    )
    at.loc[failing["inactive_or_deleted"], "status"] = "inactive"
    at.loc[failing["not_approved"], "policy_state"] = "banned"
    at.loc[failing["not_in_region"], "regions"] = "eu"
    at.loc[failing["out_of_stock"], "stock"] = 0
    at.loc[failing["campaign_ended"], ["is_sponsored", "campaign_id", "campaign_end"]] = [
        True,
        "campaign_test",
        pd.Timestamp(TINY_AS_OF - timedelta(days=1)),
    ]
    at.loc[failing["tenant_not_allowed"], "tenant_id"] = OTHER_TENANT
    at.loc[failing["hidden_creator"], "creator_id"] = HIDDEN_CREATOR
    at.loc[failing["hidden_category"], "category"] = HIDDEN_CATEGORY
    at.loc[failing["role_not_allowed"], ["tenant_id", "required_role"]] = [TENANT, "supervisor"]
    at.loc[failing["case_closed"], ["tenant_id", "case_state"]] = [TENANT, "closed"]
    at.loc[failing["own_tenant"], ["tenant_id", "required_role", "case_state"]] = [
        TENANT,
        "agent",
        "open",
    ]
    warehouse.write_parquet("raw/items/part-00000.parquet", at.reset_index())

    users = read_raw(warehouse, "users")
    template = users.iloc[[0, 0, 0]].copy()
    template["user_id"] = [CONSUMER, NO_CONSENT, AGENT]
    template["region"] = "na"
    template["consent_personalization"] = [True, False, True]
    template["email_subscribed"] = [True, True, False]
    template["push_enabled"] = [True, True, False]
    template["tenant_id"] = [None, None, TENANT]
    template["actor_role"] = [None, None, "agent"]
    warehouse.write_parquet(
        "raw/users/part-00000.parquet", pd.concat([users, template], ignore_index=True)
    )
    settings = _serving_settings()
    # Lists built from `good` items must pass publish's slate-policy re-check on their own.
    policy = settings.surface("home_feed").slate_policy
    rest = at.loc[ids[15:], ["creator_id", "category"]]
    within_caps = (rest.groupby("creator_id").cumcount() < policy.max_per_creator) & (
        rest.groupby("category").cumcount() < policy.max_per_category
    )
    good = rest.index[within_caps.to_numpy()].astype(int).tolist()
    assert len(good) >= 72, "tiny seed changed: not enough diverse plain items for serving tests"
    built = World(warehouse, settings, Clock(TINY_AS_OF), good, failing)
    yield built
    for service in built.services:
        service.close()
