"""`recsys rollback`, `recsys manifest`, `recsys export`: operate and inspect published lists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from recsys_assets.config import Settings, SurfaceConfig, load_settings
from recsys_assets.publish.manifest import active_lists, read_manifest, rollback
from recsys_assets.publish.versions import manifest_path, utc_now
from recsys_assets.rules.person import (
    consent_overrides,
    read_events,
    read_person_facts,
    without_consent,
)
from recsys_assets.rules.tombstones import load_tombstones, person_tombstones
from recsys_assets.warehouse import Warehouse

EXPORT_COLUMNS = [
    "subject_id",
    "position",
    "item_id",
    "score",
    "reason_codes",
    "source_provenance",
    "list_id",
]
EXPORT_FORMATS = (".parquet", ".csv")


def register(subparsers: Any) -> None:
    """Add the `rollback`, `manifest` and `export` subcommands."""
    rollback_parser = subparsers.add_parser(
        "rollback",
        help="make a previous published version active again",
        description=(
            "Flip the partition's manifest back to the newest previous version, or to "
            "--to VERSION. The version rolled back from is marked rolled_back. Refused "
            "when the target is expired, invalid, already rolled back, or its lists cannot "
            "be read. --force --to VERSION --reason TEXT re-activates a version rolled back "
            "by mistake."
        ),
    )
    _partition_arguments(rollback_parser)
    rollback_parser.add_argument(
        "--to", dest="to_version", help="version id to activate (default: newest previous)"
    )
    rollback_parser.add_argument(
        "--reason", help="recorded in the manifest history (required with --force)"
    )
    rollback_parser.add_argument(
        "--force",
        action="store_true",
        help="allow --to a version marked rolled_back (a rollback made by mistake)",
    )
    rollback_parser.set_defaults(handler=_rollback)

    manifest_parser = subparsers.add_parser(
        "manifest",
        help="print a partition's manifest as JSON",
        description="Active version, lineage, validation report and retained history.",
    )
    _partition_arguments(manifest_parser)
    manifest_parser.set_defaults(handler=_manifest)

    export_parser = subparsers.add_parser(
        "export",
        help="write the active lists, one row per item, as Parquet or CSV",
        description=(
            f"Columns: {', '.join(EXPORT_COLUMNS)} (plus context_key for fallback lists). "
            "The format follows the extension of --out (.parquet or .csv). The list of a "
            "person who may not get the surface now (consent revoked in the raw users, by a "
            "consent event or a policy change; a required subscription off) is withheld."
        ),
    )
    _partition_arguments(export_parser)
    export_parser.add_argument("--out", required=True, type=Path, help="output file")
    export_parser.set_defaults(handler=_export)


def _partition_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--surface", required=True, help="surface, e.g. home_feed")
    parser.add_argument("--region", required=True, help="region, e.g. na")
    parser.add_argument(
        "--fallback", action="store_true", help="the partition's fallback lists instead"
    )


def _checked(args: argparse.Namespace) -> tuple[Settings, Warehouse]:
    settings = load_settings()
    settings.surface(args.surface)
    settings.check_region(args.region)
    return settings, Warehouse.from_env()


def _rollback(args: argparse.Namespace) -> int:
    _, warehouse = _checked(args)
    before = read_manifest(warehouse, args.surface, args.region, fallback=args.fallback)
    manifest = rollback(
        warehouse,
        args.surface,
        args.region,
        to_version=args.to_version,
        reason=args.reason or ("" if args.force else "recsys rollback"),
        fallback=args.fallback,
        force=args.force,
    )
    previous = before.active_version if before else "none"
    print(
        f"surface={args.surface} region={args.region}: active version {manifest.active_version} "
        f"(was {previous}, now marked rolled_back); expires_at {manifest.expires_at}"
    )
    return 0


def _manifest(args: argparse.Namespace) -> int:
    _, warehouse = _checked(args)
    manifest = read_manifest(warehouse, args.surface, args.region, fallback=args.fallback)
    if manifest is None:
        raise FileNotFoundError(
            f"nothing is published for surface={args.surface} region={args.region}: no "
            f"{warehouse.uri(manifest_path(args.surface, args.region, fallback=args.fallback))}"
        )
    print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return 0


def _export(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix.lower() not in EXPORT_FORMATS:
        raise ValueError(
            f"--out {out}: unsupported extension {out.suffix!r}; use one of {EXPORT_FORMATS}"
        )
    settings, warehouse = _checked(args)
    lists = active_lists(warehouse, args.surface, args.region, fallback=args.fallback)
    columns = [*EXPORT_COLUMNS, "context_key"] if args.fallback else EXPORT_COLUMNS
    note = ""
    if not args.fallback:  # fallback lists hold no one's personal list
        revoked, basis = lists_without_consent(warehouse, settings.surface(args.surface), lists)
        withheld = int(lists.loc[revoked, "subject_id"].nunique())
        lists = lists[~revoked]
        note = (
            f"; withheld {withheld} list(s) of people who may not get {args.surface} now ({basis})"
        )
    flat = lists[columns].sort_values(["subject_id", "list_id", "position"], kind="stable")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        flat.to_csv(out, index=False)
    else:
        flat.to_parquet(out, index=False)
    print(f"wrote {len(flat)} rows of {flat['list_id'].nunique()} list(s) to {out}{note}")
    return 0


def lists_without_consent(
    warehouse: Warehouse, surface: SurfaceConfig, lists: pd.DataFrame
) -> tuple[pd.Series, str]:
    """Rows of personalized `lists` whose subject may not get `surface` now, and what that was
    judged by: the person rules on raw users and serving events (`rules.person`), and policy
    changes naming only the person (tombstones), as serving's final check judges them.

    Without a raw users table only the events and tombstones can withhold a list; the basis
    says so.
    """
    subject_ids = lists["subject_id"].astype("int64")
    facts = read_person_facts(warehouse)
    if facts is not None:
        revoked = without_consent(subject_ids, surface=surface, facts=facts)
        basis = "raw users, consent events, policy changes"
    else:
        revoked = subject_ids.map(consent_overrides(read_events(warehouse))).eq(False).to_numpy()
        basis = "consent events, policy changes; raw consent not checked: no raw users table"
    tombstoned = person_tombstones(load_tombstones(warehouse), now=utc_now()).no_personalization
    revoked = revoked | subject_ids.isin(list(tombstoned)).to_numpy()
    return pd.Series(revoked, index=lists.index), basis
