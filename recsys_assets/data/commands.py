"""`recsys seed` and `recsys import`: fill the warehouse's raw tables."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any

from recsys_assets.config import load_settings
from recsys_assets.contracts.raw import RAW_CONTRACTS
from recsys_assets.data.importer import ImportMapping, import_tables
from recsys_assets.data.seed import SCALES, seed_warehouse
from recsys_assets.warehouse import Warehouse


def register(subparsers: Any) -> None:
    """Add the `seed` and `import` subcommands."""
    seed = subparsers.add_parser(
        "seed",
        help="write synthetic source tables (deterministic per seed) to the warehouse",
        description=(
            "Generate users, items, interactions, exposures, user controls and editorial "
            "lists with learnable structure and every edge case the final checks handle, "
            "validate them against the contracts and write them under raw/. The warehouse "
            "comes from RECSYS_WAREHOUSE_URL (default .warehouse/ here)."
        ),
    )
    seed.add_argument(
        "--scale",
        choices=list(SCALES),
        default="tiny",
        help="tiny ≈ 500 users, small ≈ 10k, medium ≈ 100k, large ≈ 1M (default: tiny)",
    )
    seed.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    seed.add_argument(
        "--as-of",
        type=_moment,
        default=None,
        help="the 'now' of the data, UTC, e.g. 2026-11-20 (default: today's midnight UTC)",
    )
    seed.set_defaults(handler=_seed)

    imported = subparsers.add_parser(
        "import",
        help="import your own CSV/Parquet files (interactions required) as raw tables",
        description=(
            "Read your interactions (and optionally items and users) files, map their "
            "columns onto the source-table contracts, validate everything, and only then "
            "replace the warehouse's raw tables. Columns you do not map are taken from a "
            "source column of the same name or get the defaults in docs/DATA.md."
        ),
    )
    imported.add_argument("--interactions", required=True, help="interactions file (.csv/.parquet)")
    imported.add_argument("--items", help="items file; default: derived from interaction item ids")
    imported.add_argument("--users", help="users file; default: derived from interaction user ids")
    imported.add_argument("--mapping", type=Path, help="YAML column mapping (see docs/DATA.md)")
    imported.add_argument(
        "--map",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.COLUMN[.OPTION]=VALUE",
        help=(
            "one mapping entry, repeatable; applied over --mapping. e.g. "
            "interactions.item_id=movieId, interactions.ts.unit=s, "
            "interactions.event_type.constant=rating"
        ),
    )
    imported.add_argument(
        "--as-of",
        type=_moment,
        default=None,
        help="the moment the data describes, UTC; later timestamps are rejected (default: now)",
    )
    imported.set_defaults(handler=_import)


def _moment(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date or datetime: {text!r} (e.g. 2026-11-20 or 2026-11-20T06:00)"
        ) from None


def _print_counts(title: str, row_counts: dict[str, int], notes: dict[str, str]) -> None:
    print(title)
    for table in RAW_CONTRACTS:
        note = f"  ({notes[table]})" if table in notes else ""
        print(f"  {table:<14} {row_counts.get(table, 0):>12,}{note}")


def _seed(args: argparse.Namespace) -> int:
    warehouse = Warehouse.from_env()
    report = seed_warehouse(
        warehouse, scale=args.scale, seed=args.seed, settings=load_settings(), as_of=args.as_of
    )
    _print_counts(
        f"seeded {report.scale} data (seed {report.seed}, as of {report.as_of:%Y-%m-%d %H:%M} UTC) "
        f"into {warehouse.uri('raw')} in {report.elapsed_s:.1f}s; snapshot {report.snapshot_id}",
        report.row_counts,
        {table: f"{parts} parts" for table, parts in report.parts.items() if parts > 1},
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    mapping = ImportMapping.from_yaml(args.mapping) if args.mapping else ImportMapping()
    mapping = mapping.with_overrides(args.overrides)
    warehouse = Warehouse.from_env()
    report = import_tables(
        warehouse,
        interactions=args.interactions,
        items=args.items,
        users=args.users,
        mapping=mapping,
        settings=load_settings(),
        as_of=args.as_of,
    )
    _print_counts(
        f"imported into {warehouse.uri('raw')} in {report.elapsed_s:.1f}s "
        f"(as of {report.as_of:%Y-%m-%d %H:%M:%S} UTC); snapshot {report.snapshot_id}",
        report.row_counts,
        report.sources,
    )
    return 0
