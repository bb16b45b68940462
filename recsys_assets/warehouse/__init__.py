"""The warehouse: every byte the platform stores goes through here."""

from recsys_assets.warehouse.store import (
    WAREHOUSE_ENV_VAR,
    PreconditionFailed,
    Warehouse,
    WarehouseError,
    partition_path,
)

__all__ = [
    "WAREHOUSE_ENV_VAR",
    "PreconditionFailed",
    "Warehouse",
    "WarehouseError",
    "partition_path",
]
