"""Partitions: surface × region, both from configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from recsys_assets.config import Settings, load_settings

SURFACE_DIMENSION = "surface"
REGION_DIMENSION = "region"


def surface_region_partitions(settings: Settings | None = None) -> dg.MultiPartitionsDefinition:
    """Every configured surface × every configured region (default: the environment's)."""
    settings = settings or load_settings()
    return dg.MultiPartitionsDefinition(
        {
            REGION_DIMENSION: dg.StaticPartitionsDefinition(list(settings.regions)),
            SURFACE_DIMENSION: dg.StaticPartitionsDefinition(list(settings.surfaces)),
        }
    )


def bind_partitions(
    assets: Sequence[dg.AssetsDefinition], settings: Settings
) -> list[dg.AssetsDefinition]:
    """`assets`, each partitioned one re-partitioned by the surfaces × regions of `settings`.

    The asset modules declare partitions when they are imported (from the environment's
    configuration), so that tests can `materialize()` them directly. A code location binds
    them to the `Settings` it serves instead, so its partitions and its `recsys` resource
    never disagree. Every partitioned asset here is surface × region.
    """
    partitions = surface_region_partitions(settings)
    return [
        asset.map_asset_specs(lambda spec: spec.replace_attributes(partitions_def=partitions))
        if asset.partitions_def is not None
        else asset
        for asset in assets
    ]


@dataclass(frozen=True)
class SurfaceRegion:
    """One partition, in the domain's words."""

    surface: str
    region: str

    @classmethod
    def from_key(cls, key: str) -> SurfaceRegion:
        """From a MultiPartitionKey, or its string form `region|surface` (dimensions sorted)."""
        if isinstance(key, dg.MultiPartitionKey):
            dims = key.keys_by_dimension
            return cls(surface=dims[SURFACE_DIMENSION], region=dims[REGION_DIMENSION])
        parts = str(key).split("|")
        if len(parts) != 2:
            raise ValueError(f"not a surface × region partition key: {key!r}")
        region, surface = parts
        return cls(surface=surface, region=region)

    @classmethod
    def from_context(
        cls, context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext
    ) -> SurfaceRegion:
        return cls.from_key(context.partition_key)

    def to_key(self) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey(
            {SURFACE_DIMENSION: self.surface, REGION_DIMENSION: self.region}
        )

    @property
    def path(self) -> str:
        """Hive-style path segment: surface=…/region=…"""
        return f"surface={self.surface}/region={self.region}"


ONE_RUN_PER_PARTITION = dg.BackfillPolicy.multi_run(1)
"""Backfill policy of every partitioned asset.

Assets read `context.partition_key` and write their own Parquet per partition, so a single
run over a partition range cannot work; one run per partition keeps a partition's blocking
publish gate in the same run as its chain, and a failing partition fails alone. The same
policy on every asset keeps the whole chain of a partition in one run.
"""
