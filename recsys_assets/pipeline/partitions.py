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
    never disagree. Every partitioned asset here is surface × region, and so is each of its
    partitioned asset checks (their results are recorded per partition).
    """
    partitions = surface_region_partitions(settings)
    return [
        _with_partitions(asset, partitions) if asset.partitions_def is not None else asset
        for asset in assets
    ]


def _with_partitions(
    asset: dg.AssetsDefinition, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    """`asset` with `partitions` on its specs and on its partitioned check specs.

    `map_asset_specs` leaves check specs alone, and Dagster refuses an asset whose checks
    are partitioned differently from it; nothing public replaces a check spec, so this
    rebuilds the definition the way `map_asset_specs` itself does.
    """
    mapped = asset.map_asset_specs(lambda spec: spec.replace_attributes(partitions_def=partitions))
    checks = mapped.node_check_specs_by_output_name
    if not any(check.partitions_def is not None for check in checks.values()):
        return mapped
    return dg.AssetsDefinition.dagster_internal_init(
        **{
            **mapped.get_attributes_dict(),
            "check_specs_by_output_name": {
                output: check._replace(partitions_def=partitions)
                if check.partitions_def is not None
                else check
                for output, check in checks.items()
            },
        }
    )


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
        cls,
        context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext | dg.OpExecutionContext,
    ) -> SurfaceRegion:
        """Of an asset's step, or of a step inside a graph-backed asset (a shard step)."""
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
