"""List records and the batch decision log: send times, tracking tokens, candidate counts."""

from __future__ import annotations

import hashlib
import hmac

import pandas as pd

from recsys_assets.publish.lists import (
    candidate_counts,
    decision_log,
    finalize_lists,
    tracking_token,
)
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.publish.builders import REGION, make_lists, settings


def _log(surface: str, subjects_override: pd.DataFrame | None = None, **kw) -> pd.DataFrame:
    lists, _, subjects = make_lists(surface, n_subjects=4)
    records = finalize_lists(lists, surface=surface, region=REGION, version="v1", fallback=False)
    return decision_log(
        records,
        surface=settings().surface(surface),
        subjects=subjects if subjects_override is None else subjects_override,
        secret="k",
        **kw,
    )


def test_email_is_scheduled_at_the_local_send_hour() -> None:
    log = _log("email_daily")  # send_hour_local 9; lists generated 2026-11-20 12:00 UTC
    by_subject = dict(zip(log["subject_id"], log["scheduled_send_at"], strict=True))
    assert by_subject[100] == pd.Timestamp("2026-11-20 14:00")  # New York 09:00 (UTC-5)
    assert by_subject[101] == pd.Timestamp("2026-11-21 08:00")  # Berlin 09:00 (UTC+1)
    assert by_subject[102] == pd.Timestamp("2026-11-21 00:00")  # Tokyo 09:00 (UTC+9)
    assert by_subject[103] == pd.Timestamp("2026-11-21 09:00")  # UTC


def test_push_waits_for_the_end_of_quiet_hours() -> None:
    _, _, subjects = make_lists("push", n_subjects=4)
    subjects.loc[subjects["subject_id"] == 102, ["quiet_hours_start", "quiet_hours_end"]] = [20, 8]
    log = _log("push", subjects)  # default quiet hours 22:00-07:00 local
    by_subject = dict(zip(log["subject_id"], log["scheduled_send_at"], strict=True))
    assert by_subject[100] == pd.Timestamp("2026-11-20 12:00")  # New York 07:00: not quiet
    assert by_subject[102] == pd.Timestamp("2026-11-20 23:00")  # Tokyo 21:00 quiet → 08:00


def test_tracking_tokens_are_hmacs_of_list_item_and_position() -> None:
    log = _log("email_daily")
    row = log.iloc[0]
    first_item = int(row["selected_item_ids"].split("|")[0])
    expected = hmac.new(
        b"k", f"{row['list_id']}|{first_item}|1".encode(), hashlib.sha256
    ).hexdigest()
    assert row["tracking_tokens"].split("|")[0] == expected
    assert tracking_token(row["list_id"], first_item, 1, "k") == expected
    assert row["item_count"] == len(row["tracking_tokens"].split("|"))


def test_feeds_get_no_send_time_and_candidate_counts_come_from_candidate_pools(
    local_warehouse: Warehouse,
) -> None:
    pools = pd.DataFrame({"subject_id": [100, 100, 101], "item_id": [1, 2, 3]})
    local_warehouse.write_parquet(
        "pipeline/candidate_pools/surface=home_feed/region=na/part-00000.parquet", pools
    )
    counts = candidate_counts(local_warehouse, "home_feed", "na")
    log = _log("home_feed", candidates=counts)
    assert log["scheduled_send_at"].isna().all()
    assert log["tracking_tokens"].isna().all()
    counted = log.set_index("subject_id")["candidate_count"]
    assert counted[[100, 101]].tolist() == [2, 1]
    assert counted[[102, 103]].isna().all()  # no candidates recorded: null, not zero
    assert candidate_counts(local_warehouse, "push", "na") is None
