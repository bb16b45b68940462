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


def backfill_partitions(
    settings: Settings,
    *,
    regions: Sequence[str] | None = None,
    surfaces: Sequence[str] | None = None,
) -> list[SurfaceRegion]:
    """The partitions of the chosen regions × surfaces (default: all), validated."""
    chosen_regions = [settings.check_region(r) for r in regions] if regions else settings.regions
    chosen_surfaces = (
        [settings.surface(s).name for s in surfaces] if surfaces else settings.surfaces
    )
    return [
        SurfaceRegion(surface, region) for region in chosen_regions for surface in chosen_surfaces
    ]


def partitions_argument(partitions: Sequence[SurfaceRegion]) -> str:
    """The `--partitions` value of `dagster job backfill`: keys `region|surface`, comma-joined."""
    return ",".join(str(partition.to_key()) for partition in partitions)
