"""Send-plan benchmark: `plan_sends` throughput for N synthetic subscribers.

    python benchmarks/bench_send_plans.py [--subscribers 100000] [--surface email_daily]
                                          [--items 10] [--region na] [--workdir DIR]

Builds a temp warehouse the way the channel tests do: the tiny seeded raw tables (seed 1,
as of 2026-11-20), plus N subscribed users in `--region` (cloned from a seeded user, with
consent, email and push on, spread over four timezones, quiet 22-07), and an active version
of `--surface` with one `--items`-item list per subscriber over plain eligible items
(written in the documented format by the tests' `published.activate_version`, publish's
own `decision_log` giving send times and tracking tokens). A tenth of the subscribers have
a send in the ledger 4 h before their send, so the send cap is read and applied.

Only the plan computation is timed: `plan_sends` (loading the online state, person facts,
ledger and lists, then the rules over all subjects), not the seeding or the writing of the
plan. The warehouse is built in a spawned child process, so `peak_rss_mib` is the planning
process's own peak. The last line is JSON: subscribers, seconds, subscribers_per_s,
peak_rss_mib, sends, skips.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' published-version writer

AS_OF = datetime(2026, 11, 20)
SEED = 1
FIRST_ID = 5_000_000
ZONES = np.array(["UTC", "America/New_York", "Europe/Berlin", "America/Los_Angeles"])


def _peak_rss_mib() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if sys.platform == "darwin" else usage / 1024


def build(folder: Path, subscribers: int, surface_name: str, region: str, items: int) -> None:
    from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, send_key
    from recsys_assets.config import load_settings
    from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
    from recsys_assets.data.seed import seed_warehouse
    from recsys_assets.data.snapshot import read_raw
    from recsys_assets.publish.lists import decision_log
    from recsys_assets.warehouse import Warehouse, partition_path
    from recsys_assets_tests.serving.published import activate_version, version_id

    settings = load_settings(DEFAULT_CONFIG_PATH)
    warehouse = Warehouse(folder.as_uri())
    seed_warehouse(warehouse, scale="tiny", seed=SEED, settings=settings, as_of=AS_OF)
    rng = np.random.default_rng(SEED)

    catalog = read_raw(warehouse, "items")
    plain = (
        (catalog["status"] == "active")
        & (catalog["policy_state"] == "approved")
        & (catalog["regions"] == "*")
        & (catalog["stock"] != 0)
        & ~catalog["is_sponsored"]
        & catalog["tenant_id"].isna()
        & catalog["required_role"].isna()
        & catalog["case_state"].isna()
        & (catalog["risk_level"] != "high")
    )
    pool = catalog.loc[plain, "item_id"].to_numpy(dtype=np.int64)

    users = read_raw(warehouse, "users")
    ids = np.arange(FIRST_ID, FIRST_ID + subscribers, dtype=np.int64)
    added = users.iloc[np.zeros(subscribers, dtype=int)].reset_index(drop=True)
    added["user_id"] = ids
    added["region"] = region
    added["consent_personalization"] = True
    added["email_subscribed"] = True
    added["push_enabled"] = True
    added["tenant_id"] = None
    added["actor_role"] = None
    added["timezone"] = ZONES[rng.integers(0, len(ZONES), subscribers)]
    added["quiet_hours_start"], added["quiet_hours_end"] = 22, 7
    users = pd.concat([users, added], ignore_index=True)
    warehouse.write_parquet("raw/users/part-00000.parquet", users)

    generated_at = AS_OF - timedelta(hours=1)
    ttl = pd.Timedelta(settings.surface(surface_name).ttl) + timedelta(hours=12)
    version = version_id(generated_at)
    picks = np.stack([rng.choice(pool, size=items, replace=False) for _ in range(subscribers)])
    positions = np.tile(np.arange(1, items + 1), subscribers)
    subject = np.repeat(ids, items)
    lists = pd.DataFrame(
        {
            "list_id": [f"precomp_{surface_name}_{s}_{version}" for s in subject],
            "subject_id": subject,
            "surface": surface_name,
            "region": region,
            "context_key": "default",
            "version": version,
            "generated_at": generated_at,
            "expires_at": generated_at + ttl,
            "model_version": "model_bench",
            "feature_set_version": "features_v1",
            "candidate_policy_version": "candidates_v1",
            "slate_policy_version": "slate_v1",
            "pipeline_run_id": "bench_send_plans",
            "source_data_snapshot": "snap-bench",
            "position": positions,
            "item_id": picks.reshape(-1),
            "item_type": "product",
            "score": 1.0 / positions,
            "calibrated": np.clip(rng.beta(5, 2, len(positions)) / np.sqrt(positions), 0, 1),
            "reason_codes": "two_tower|high_confidence",
            "source_provenance": "two_tower|trending",
            "exploration": False,
            "propensity": 1.0,
        }
    )
    root = "published/" + partition_path(surface=surface_name, region=region)
    folder_path = f"{root}/versions/{version}"
    warehouse.write_parquet(f"{folder_path}/lists.parquet", lists)
    warehouse.write_json(f"{folder_path}/validation.json", {"passed": True, "failures": []})
    log = decision_log(
        lists,
        surface=settings.surface(surface_name),
        subjects=users.rename(columns={"user_id": "subject_id"}),
        secret="bench-secret",
    )
    warehouse.write_parquet(f"{folder_path}/decision_log.parquet", log)
    activate_version(warehouse, root, version, generated_at, ttl)

    capped = log.iloc[: max(1, subscribers // 10)]
    medium = "push" if surface_name == "push" else "email"
    earlier = pd.to_datetime(capped["scheduled_send_at"]) - pd.Timedelta(hours=4)
    prior = pd.DataFrame(
        {
            "send_key": [
                send_key(surface_name, s, t.date().isoformat())
                for s, t in zip(capped["subject_id"], earlier, strict=True)
            ],
            "subject_id": capped["subject_id"].astype("int64").to_numpy(),
            "surface": surface_name,
            "medium": medium,
            "region": region,
            "send_date": [t.date().isoformat() for t in earlier],
            "send_at": earlier.to_numpy(),
            "handed_over_at": (earlier - pd.Timedelta(hours=1)).to_numpy(),
            "list_id": [f"earlier_{s}" for s in capped["subject_id"]],
            "version": "v_earlier",
            "model_version": "model_bench",
            "item_id": int(pool[0]),
            "position": 1,
            "tracking_token": "0" * 64,
            "message_path": "channels/outbox/earlier.eml",
        },
        columns=list(SEND_SCHEMA),
    )
    append_sends(warehouse, prior, handed_over_at=pd.Timestamp(AS_OF) - pd.Timedelta(hours=6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--surface", default="email_daily")
    parser.add_argument("--region", default="na")
    parser.add_argument("--items", type=int, default=10, help="items per published list")
    parser.add_argument("--workdir", type=Path, default=None, help="kept; default: a temp dir")
    args = parser.parse_args()

    from recsys_assets.channels.plans import plan_sends
    from recsys_assets.config import load_settings
    from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
    from recsys_assets.warehouse import Warehouse

    with tempfile.TemporaryDirectory(prefix="bench_send_plans_") as temp:
        folder = (args.workdir or Path(temp)) / "warehouse"
        started = time.perf_counter()
        builder = multiprocessing.get_context("spawn").Process(
            target=build, args=(folder, args.subscribers, args.surface, args.region, args.items)
        )
        builder.start()
        builder.join()
        if builder.exitcode != 0:
            raise SystemExit(f"building the warehouse failed (exit code {builder.exitcode})")
        built_s = time.perf_counter() - started
        print(f"built {args.subscribers} subscribers in {built_s:.1f}s", file=sys.stderr)
        rss_before = _peak_rss_mib()

        settings = load_settings(DEFAULT_CONFIG_PATH)
        warehouse = Warehouse(folder.as_uri())
        started = time.perf_counter()
        plan = plan_sends(warehouse, settings, args.surface, args.region, now=AS_OF)
        seconds = time.perf_counter() - started

    subjects = len(plan.decisions)
    summary = {
        "surface": args.surface,
        "region": args.region,
        "subscribers": args.subscribers,
        "planned_subjects": subjects,
        "items_per_list": args.items,
        "seconds": round(seconds, 3),
        "subscribers_per_s": round(subjects / seconds, 1),
        "sends": plan.sends,
        "skips_by_reason": plan.skips_by_reason(),
        "build_seconds": round(built_s, 1),
        "peak_rss_mib_before_plan": round(rss_before, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }
    print(
        f"plan_sends {args.surface}/{args.region}: {subjects} subscribers in {seconds:.1f} s "
        f"({subjects / seconds:,.0f}/s), sends {plan.sends}, skips {plan.skips_by_reason()}, "
        f"peak RSS {summary['peak_rss_mib']:.0f} MiB ({rss_before:.0f} MiB before the plan)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
