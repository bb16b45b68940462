"""Backfills of one region across surfaces (or one surface across regions).

The partition assets write their own Parquet per partition path and read
`context.partition_key`, so a run covers exactly one partition: the backfill policy is
`BackfillPolicy.multi_run(1)` (docs/AUTOMATION.md "Backfills" says why). These helpers
name the partitions of a backfill for the CLI and for code.
"""

from __future__ import annotations

from collections.abc import Sequence

from recsys_assets.config import Settings
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.runner import select_partitions


def backfill_partitions(
    settings: Settings,
    *,
    regions: Sequence[str] | None = None,
    surfaces: Sequence[str] | None = None,
) -> list[SurfaceRegion]:
    """The enabled partitions of the chosen regions × surfaces (default: all), validated
    the way `recsys run` validates them."""
    return select_partitions(settings, surfaces, regions)


def partitions_argument(partitions: Sequence[SurfaceRegion]) -> str:
    """The `--partitions` value of `dagster job backfill`: keys `region|surface`, comma-joined."""
    return ",".join(str(partition.to_key()) for partition in partitions)
