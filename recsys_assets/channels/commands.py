"""`recsys send`: hand the partition's current send plan to the sender, once per message."""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd

from recsys_assets.channels.delivery import deliver_partition
from recsys_assets.channels.plans import plan_root
from recsys_assets.config import load_settings
from recsys_assets.warehouse import Warehouse


def register(subparsers: Any) -> None:
    """Add the `send` subcommand."""
    parser = subparsers.add_parser(
        "send",
        help="send the partition's planned email / push messages (to the warehouse outbox)",
        description=(
            "Renders every message of the current send plan (materialize send_plans first) "
            "and writes it to channels/outbox/... (.eml for email, .json for push), recording "
            "each send in channels/sends/.... A message already sent for the same (channel, "
            "subject, send date) is never sent again; a subject who unsubscribed since the "
            "plan is withdrawn. Links point at RECSYS_TRACKING_BASE_URL (the public URL of "
            "`recsys serve`); without it only --dry-run runs. --dry-run renders and counts, "
            "writes nothing."
        ),
    )
    parser.add_argument("--surface", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--dry-run", action="store_true", help="count only, write nothing")
    parser.set_defaults(handler=_send)


def _send(args: argparse.Namespace) -> int:
    warehouse = Warehouse.from_env()
    report = deliver_partition(
        warehouse,
        load_settings(),
        args.surface,
        args.region,
        now=pd.Timestamp.now("UTC").tz_localize(None).floor("us"),
        dry_run=args.dry_run,
    )
    skipped = _plan_skips(warehouse, args.surface, args.region)
    print(f"recsys send {args.surface}/{args.region}: {report.summary()}{skipped}")
    return 0


def _plan_skips(warehouse: Warehouse, surface: str, region: str) -> str:
    """ "; the plan skipped N (reason n, …)" from the plan's summary, so an empty send says why."""
    try:
        summary = warehouse.read_json(f"{plan_root(surface, region)}/summary.json")
    except FileNotFoundError:
        return ""
    skips = {str(reason): int(n) for reason, n in (summary.get("skips_by_reason") or {}).items()}
    if not skips:
        return ""
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skips.items()))
    return f"; the plan skipped {sum(skips.values())} ({reasons}: docs/CHANNELS.md)"
