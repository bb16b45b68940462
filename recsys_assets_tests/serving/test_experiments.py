"""Serving modes and experiments: the split is stable per subject and balanced within 2% at
10k subjects; each arm is served in its mode, shown in the response as `experiment`,
logged in the decision log, and counted per arm in /metrics (click-through included, from
opens and clicks presented with their tracking tokens)."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, send_key
from recsys_assets.config import ConfigError, Settings
from recsys_assets.config.settings import (
    DEFAULT_CONFIG_PATH,
    ExperimentConfig,
    settings_from_mapping,
)
from recsys_assets.publish.lists import TRACKING_SECRET_ENV_VAR, tracking_token
from recsys_assets.serving.api import create_app
from recsys_assets.serving.experiments import Experiment
from recsys_assets_tests.serving.conftest import CONSUMER, READER, TOKENS, World
from recsys_assets_tests.serving.decisions import read_decision_log
from recsys_assets_tests.serving.published import write_version

SPLIT = ExperimentConfig.model_validate(
    {
        "id": "slate_vs_fallback",
        "arms": {
            "control": {"serving_mode": "final_slate", "weight": 1},
            "fallback": {"serving_mode": "fallback_only", "weight": 1},
        },
    }
)


def test_split_is_stable_per_subject_and_balanced_within_2_percent_at_10k() -> None:
    subjects = range(10_000)
    experiment = Experiment(SPLIT)
    first = [experiment.assign(s).arm for s in subjects]
    assert [Experiment(SPLIT).assign(s).arm for s in subjects] == first  # any process, any time
    shares = Counter(first)
    assert set(shares) == {"control", "fallback"}
    for arm in ("control", "fallback"):
        assert abs(shares[arm] / 10_000 - 0.5) <= 0.02, shares

    three_to_one = SPLIT.model_dump()
    three_to_one["arms"]["fallback"]["weight"] = 3.0
    weighted = Experiment(ExperimentConfig.model_validate(three_to_one))
    quarter = sum(weighted.assign(s).arm == "control" for s in subjects) / 10_000
    assert abs(quarter - 0.25) <= 0.02

    reshuffled = Experiment(SPLIT.model_copy(update={"id": "another_experiment"}))
    moved = sum(reshuffled.assign(s).arm != arm for s, arm in zip(subjects, first, strict=True))
    assert 0.4 <= moved / 10_000 <= 0.6  # a new id splits independently of the old one
    split = experiment.split(subjects)
    assert sorted(len(ids) for ids in split.values()) == sorted(shares.values())


def _surface_config(**home_feed: Any) -> dict[str, Any]:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["surfaces"]["home_feed"].update(home_feed)
    return data


@pytest.mark.parametrize(
    ("home_feed", "message"),
    [
        (
            {"serving_mode": "candidate_pool_rerank"},
            "surfaces.home_feed: serving_mode 'candidate_pool_rerank' needs storage_mode",
        ),
        (
            {
                "experiment": {
                    "id": "x",
                    "arms": {
                        "a": {"serving_mode": "final_slate", "weight": 1},
                        "b": {"serving_mode": "candidate_pool_rerank", "weight": 1},
                    },
                }
            },
            "experiment.arms.b.serving_mode 'candidate_pool_rerank' needs storage_mode",
        ),
        (
            {
                "experiment": {
                    "id": "x",
                    "arms": {"a": {"serving_mode": "final_slate", "weight": 1}},
                }
            },
            "needs at least two arms",
        ),
        (
            {
                "experiment": {
                    "id": "x",
                    "arms": {
                        "a": {"serving_mode": "final_slate", "weight": 0},
                        "b": {"serving_mode": "fallback_only", "weight": 1},
                    },
                }
            },
            "experiment.arms.a.weight",
        ),
        ({"serving_mode": "final-slate"}, "home_feed.serving_mode"),
        ({"experiment": {"id": "has space", "arms": {}}}, "experiment.id"),
    ],
)
def test_bad_modes_and_experiments_fail_at_load_naming_the_key(
    home_feed: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from_mapping(_surface_config(**home_feed), "surfaces.yaml")


def _with_home_feed(settings: Settings, **update: Any) -> Settings:
    home = settings.surfaces["home_feed"].model_copy(update=update)
    return settings.model_copy(update={"surfaces": {**settings.surfaces, "home_feed": home}})


def _publish(world: World, subjects: list[int]) -> list[int]:
    """Everyone's list: good[:30]; fallback lists: good[40:60] (returned)."""
    now = world.clock.now
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {subject: world.good[:30] for subject in subjects},
        generated_at=now - timedelta(hours=1),
        ttl=timedelta(hours=6),
    )
    fallback = world.good[40:60]
    write_version(
        world.warehouse,
        "home_feed",
        "na",
        {"popular_by_region": fallback, "new_user_default": fallback},
        generated_at=now - timedelta(minutes=5),
        ttl=timedelta(minutes=30),
        fallback=True,
    )
    return fallback


def _consenting_users(world: World, count: int) -> list[int]:
    users = world.warehouse.read_parquet("raw/users")
    chosen = users.loc[users["consent_personalization"].astype(bool), "user_id"]
    return [CONSUMER, *chosen.astype(int).head(count - 1).tolist()]


def test_fallback_only_mode_serves_the_fallback_lists_with_the_final_check(world: World) -> None:
    fallback = _publish(world, [CONSUMER])
    world.settings = _with_home_feed(world.settings, serving_mode="fallback_only")
    service = world.service()
    response = service.recommend(CONSUMER, "home_feed", "na")
    assert response.served_from == "fallback"
    assert [item["item_id"] for item in response.items] == fallback
    assert response.to_dict()["experiment"] is None


def test_each_arm_is_served_in_its_mode_shown_logged_and_counted(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    subjects = _consenting_users(world, 40)
    fallback = _publish(world, subjects)
    world.settings = _with_home_feed(world.settings, experiment=SPLIT)
    experiment = Experiment(SPLIT)
    arms = {subject: experiment.assign(subject).arm for subject in subjects}
    assert set(arms.values()) == {"control", "fallback"}
    secret = "experiment-test-secret"
    monkeypatch.setenv(TRACKING_SECRET_ENV_VAR, secret)
    clicked_subject = next(s for s, arm in arms.items() if arm == "fallback")
    token = _send(world, subjects, secret, clicked_subject)
    service = world.service()

    with TestClient(create_app(service, tokens=TOKENS)) as client:
        for subject in subjects:
            response = client.get(
                "/v1/recommendations/home_feed",
                params={"subject_id": subject, "region": "na"},
                headers={"Authorization": f"Bearer {READER}"},
            )
            body = response.json()
            assert body["experiment"] == {"id": "slate_vs_fallback", "arm": arms[subject]}
            served = {item["item_id"] for item in body["items"]}
            # Seeded users have consumed or hidden a few items: the check refuses those.
            assert len(served) >= 15
            if arms[subject] == "control":
                assert body["served_from"] == "precomputed"
                assert served <= set(world.good[:30])
            else:
                assert body["served_from"] == "fallback"
                assert served <= set(fallback)
        reader = {"Authorization": f"Bearer {READER}"}
        before = _samples(client.get("/metrics", headers=reader).text)
        click = client.post("/v1/events", json={"type": "click", "tracking_token": token})
        assert click.status_code == 202, click.text
        metrics = client.get("/metrics", headers=reader).text

    fallback_arm = {"surface": "home_feed", "experiment": "slate_vs_fallback", "arm": "fallback"}
    key = ("recsys_experiment_clicked_sends_total", frozenset(fallback_arm.items()))
    assert before[key] == 0  # the scrape before the click

    per_arm = Counter(arms.values())
    samples = _samples(metrics)
    experiment_labels = {"surface": "home_feed", "experiment": "slate_vs_fallback"}

    def sample(name: str, **labels: str) -> float:
        return samples[(name, frozenset({**experiment_labels, **labels}.items()))]

    requests = "recsys_experiment_requests_total"
    assert sample(requests, arm="control", served_from="precomputed") == per_arm["control"]
    assert sample(requests, arm="fallback", served_from="fallback") == per_arm["fallback"]
    assert sample("recsys_experiment_latency_seconds_count", arm="control") == per_arm["control"]
    assert sample("recsys_experiment_sends_total", arm="fallback") == per_arm["fallback"]
    assert sample("recsys_experiment_clicked_sends_total", arm="fallback") == 1
    assert sample("recsys_experiment_clicked_sends_total", arm="control") == 0
    assert sample("recsys_experiment_ctr", arm="fallback") == pytest.approx(1 / per_arm["fallback"])

    service.decision_log.flush()
    log = read_decision_log(world.warehouse)
    logged = dict(zip(log["subject_id"], log["experiment_arm"], strict=True))
    assert logged == arms
    modes = dict(zip(log["subject_id"], log["serving_mode"], strict=True))
    assert {modes[s] for s, arm in arms.items() if arm == "fallback"} == {"fallback_only"}
    assert set(log["experiment_id"]) == {"slate_vs_fallback"}


def _send(world: World, subjects: list[int], secret: str, clicked: int) -> str:
    """One home_feed message per subject in the sends ledger; the token of `clicked`'s."""
    handed_over = pd.Timestamp(world.clock.now)
    rows = []
    for subject in subjects:
        list_id = f"precomp_home_feed_{subject}"
        rows.append(
            {
                "send_key": send_key("home_feed", subject, handed_over.date()),
                "subject_id": subject,
                "surface": "home_feed",
                "medium": "email",
                "region": "na",
                "send_date": handed_over.date().isoformat(),
                "send_at": handed_over,
                "handed_over_at": handed_over,
                "list_id": list_id,
                "version": "v1",
                "model_version": "model_a",
                "item_id": world.good[0],
                "position": 1,
                "tracking_token": tracking_token(list_id, world.good[0], 1, secret),
                "message_path": f"outbox/{subject}.eml",
            }
        )
    sends = pd.DataFrame(rows)[list(SEND_SCHEMA)]
    append_sends(world.warehouse, sends, handed_over_at=handed_over)
    return str(sends.loc[sends["subject_id"] == clicked, "tracking_token"].iloc[0])


def _samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
