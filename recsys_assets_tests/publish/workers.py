"""Publisher processes for the crash and concurrency tests (importable by forkserver)."""

from __future__ import annotations

import os

from recsys_assets.config import Settings
from recsys_assets.publish import publish_version
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import REGION, SURFACE, later, make_lists, settings


def retaining(count: int) -> Settings:
    base = settings()
    return base.model_copy(
        update={"publish": base.publish.model_copy(update={"retain_versions": count})}
    )


def publish_times(url: str, env: dict[str, str], count: int, retain: int) -> list[str]:
    """Publish `count` versions (count < 0: until killed); return the versions that went live."""
    os.environ.update(env)
    warehouse = Warehouse(url)
    config = retaining(retain)
    lists, items, subjects = make_lists()
    published = []
    done = 0
    while count < 0 or done < count:
        outcome = publish_version(
            warehouse,
            config,
            SURFACE,
            REGION,
            lists,
            items=items,
            subjects=subjects,
            now=later(1),
            tracking_secret="test",
        )
        assert outcome.published, outcome.failures
        published.append(outcome.version)
        done += 1
    return published


def publish_until_killed(url: str, env: dict[str, str]) -> None:
    publish_times(url, env, -1, 3)
