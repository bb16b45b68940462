"""End to end on tiny seeded data: `recsys evaluate` and the `evaluation` asset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from recsys_assets.data import read_snapshot
from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.evaluation import commands
from recsys_assets.evaluation.evaluate import mean_list_length, training_tables
from recsys_assets.warehouse import Warehouse


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def files_under(root: str) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in Path(root).rglob("*")}


def test_training_tables_hold_nothing_from_after_the_split() -> None:
    interactions = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1],
            "item_id": [1, 2, 3, 4, 5],
            "event_type": "click",
            "value": 1.0,
            "ts": pd.date_range("2026-10-01", periods=5, freq="D"),
        }
    )
    split = temporal_holdout(interactions, holdout=0.4, seed=0)
    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5, 6, 7],
            "created_at": pd.to_datetime(["2026-09-01"] * 5 + ["2026-10-05", "2026-09-01"]),
        }
    )
    tables = {
        "interactions": interactions,
        "items": items,
        "users": pd.DataFrame({"user_id": [1], "last_active_at": [pd.Timestamp("2026-10-05")]}),
        "exposures": pd.DataFrame({"item_id": [1, 4, 6], "ts": pd.to_datetime(["2026-10-02"] * 3)}),
        "user_controls": pd.DataFrame({"ts": pd.to_datetime(["2026-10-02", "2026-10-04"])}),
        "editorial": pd.DataFrame({"item_id": [2, 5, 6, 7]}),
    }
    past = training_tables(tables, split)
    assert split.split_time == pd.Timestamp("2026-10-03")
    assert past["interactions"]["item_id"].tolist() == [1, 2, 3]
    # 4, 5: known only from held-out rows; 6: created after the split, never interacted with.
    assert past["items"]["item_id"].tolist() == [1, 2, 3, 7]
    assert past["users"]["last_active_at"].tolist() == [pd.Timestamp("2026-10-03")]
    assert past["exposures"]["item_id"].tolist() == [1]
    assert len(past["user_controls"]) == 1
    assert past["editorial"]["item_id"].tolist() == [2, 7]


def test_items_known_only_from_held_out_rows_leave_the_scratch_catalog() -> None:
    """Regression: an item seen only in held-out rows stayed in the scratch catalog when its
    created_at was before the split, telling the pipeline which items come next."""
    days = pd.to_datetime(["2026-10-01", "2026-10-02", "2026-10-03", "2026-10-08"])
    interactions = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 2, 2, 2, 2],
            "item_id": [10, 11, 12, 13, 10, 12, 14, 11],
            "event_type": "click",
            "value": 1.0,
            "ts": days.append(days + pd.Timedelta(days=1)),
        }
    )
    split = temporal_holdout(interactions, holdout=0.25, seed=0)
    # Held out: user 1's item 13 (nobody trained on it) and user 2's item 11 (user 1 did).
    assert split.held_out["item_id"].tolist() == [13, 11]
    tables = {
        "interactions": interactions,
        "items": pd.DataFrame(
            {
                "item_id": [10, 11, 12, 13, 14, 15, 16],
                "created_at": pd.to_datetime(["2026-01-01"] * 6 + ["2026-10-09"]),
            }
        ),
        "users": pd.DataFrame({"user_id": [1, 2], "last_active_at": pd.Timestamp("2026-10-09")}),
        "exposures": pd.DataFrame({"item_id": [13, 15], "ts": pd.Timestamp("2026-10-01")}),
        "user_controls": pd.DataFrame({"ts": pd.to_datetime([])}),
        "editorial": pd.DataFrame({"item_id": [13, 15]}),
    }
    past = training_tables(tables, split)
    # 15: never interacted with, created before the split (kept); 16: created after it.
    assert past["items"]["item_id"].tolist() == [10, 11, 12, 14, 15]
    assert past["exposures"]["item_id"].tolist() == [15]
    assert past["editorial"]["item_id"].tolist() == [15]


def test_mean_list_length_counts_missing_lists_and_skips_subjects_without_history() -> None:
    lists = pd.DataFrame(
        {"user_id": [1, 1, 1, 1, 3], "rank": [1, 2, 3, 4, 1], "item_id": [7, 8, 9, 9, 7]}
    )
    train = pd.DataFrame({"user_id": [1, 2, 2, 4]})
    # Subject 1: 3 distinct items; 2: no list (0); 3: no history (left out); 4: not a subject.
    assert mean_list_length(lists, np.array([1, 2, 3]), train) == 1.5
    assert mean_list_length(lists, np.array([3]), train) == 0.0


def test_recsys_evaluate_on_tiny_data(
    tiny_warehouse: Warehouse, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_under(tiny_warehouse.root)
    snapshot = read_snapshot(tiny_warehouse)["snapshot_id"]

    assert run_cli(["evaluate", "--k", "20", "--holdout", "0.2", "--seed", "3"]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert "recall@20" in lines[0] and "ndcg@20" in lines[0]
    assert any(line.startswith("home_feed ") and "ALS (implicit)" in line for line in lines)
    assert report["k"] == 20 and report["split"]["seed"] == 3
    home = report["surfaces"]["home_feed"]
    assert set(home["metrics"]) >= {
        "lists",
        "utility_only",
        "popularity",
        "item_knn",
        "als",
        "ease",
    }
    users = {metrics["users"] for metrics in home["metrics"].values()}
    assert len(users) == 1 and users.pop() > 0  # every method on the same users
    for metrics in home["metrics"].values():
        for name in ("recall", "ndcg", "hit_rate", "coverage", "diversity"):
            assert 0.0 <= metrics[name] <= 1.0
    assert home["metrics"]["lists"]["users_with_list"] > 0
    assert home["lists_source"] in ("published", "slates")
    assert home["store_depth"] == 100
    assert 0.0 < home["mean_list_length"] <= home["store_depth"]
    assert 0.0 < home["source_recall"]["any"] <= 1.0
    assert set(home["beats_baselines"]) == {"recall", "ndcg"}
    # The user's warehouse was only read.
    assert files_under(tiny_warehouse.root) == before
    assert read_snapshot(tiny_warehouse)["snapshot_id"] == snapshot


def test_evaluation_asset_puts_the_table_in_metadata(tiny_warehouse: Warehouse) -> None:
    from recsys_assets.evaluation.assets import evaluation
    from recsys_assets.pipeline.resources import RecsysResource

    result = dg.materialize(
        [evaluation],
        resources={"recsys": RecsysResource(warehouse_url=tiny_warehouse.url)},
        run_config={"ops": {"evaluation": {"config": {"k": 10, "seed": 3}}}},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("evaluation")[0].metadata
    table = metadata["evaluation"].value
    assert "| home_feed | lists |" in table and "| home_feed | ALS (implicit) |" in table
    assert metadata["k"].value == 10
    assert isinstance(metadata["home_feed_recall_beats_baselines"].value, bool)
