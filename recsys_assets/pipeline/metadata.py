"""Materialization metadata the Dagster UI can chart, link and describe.

The asset's Plots view charts numeric entries only, one series per key, across
materializations: so a distribution is reported as separate float entries (`…_p50`,
`…_p95`, `…_mean`), never as one JSON blob, and a value that never changes (a seed, a
version) is text, not a number that plots as a flat line.
"""

from __future__ import annotations

import numpy as np
import pandera.pandas as pa
from dagster import MetadataValue, TableColumn, TableSchema

from recsys_assets.pipeline.shards import markdown_table, quantiles
from recsys_assets.warehouse import Warehouse

ROW_COUNT = "dagster/row_count"
"""Dagster's standard row-count key: the UI shows it on the asset and charts it."""
COLUMN_SCHEMA = "dagster/column_schema"
"""Dagster's standard column-schema key: the asset page lists the columns and their types."""
LOCATION = "location"
"""Where the materialized data lies in the warehouse (a path, or a URL for object storage)."""


def location(warehouse: Warehouse, relative: str) -> MetadataValue:
    """A local path for a file warehouse (the UI offers to copy it), a URL otherwise."""
    uri = warehouse.uri(relative)
    if uri.startswith("file://"):
        return MetadataValue.path(warehouse.path(relative))
    return MetadataValue.url(uri)


def distribution(
    name: str, values: np.ndarray, points: tuple[float, ...] = (0.5, 0.95)
) -> dict[str, float]:
    """`{name}_p50`, `{name}_p95`, …, `{name}_mean` as floats (0.0 for no values)."""
    array = np.asarray(values, dtype=np.float64)
    stats = {f"{name}_{point}": value for point, value in quantiles(array, points).items()}
    stats[f"{name}_mean"] = round(float(array.mean()), 4) if array.size else 0.0
    return stats


class ScoreHistogram:
    """Counts of calibrated P(engage) in ten fixed buckets over [0, 1], added shard by shard.

    Fixed buckets (not quantiles of this run) so that two materializations compare
    bucket by bucket.
    """

    def __init__(self, buckets: int = 10) -> None:
        self.edges = np.linspace(0.0, 1.0, buckets + 1)
        self.counts = np.zeros(buckets, dtype=np.int64)

    def add(self, scores: np.ndarray) -> None:
        array = np.asarray(scores, dtype=np.float64)
        finite = np.clip(array[np.isfinite(array)], 0.0, 1.0)
        self.counts += np.histogram(finite, bins=self.edges)[0]

    def to_markdown(self, counted: str) -> MetadataValue:
        """A Markdown table: bucket of calibrated P(engage) → how many `counted`."""
        rows = {
            f"{low:.1f}–{high:.1f}": int(count)
            for low, high, count in zip(self.edges[:-1], self.edges[1:], self.counts, strict=True)
        }
        return MetadataValue.md(markdown_table(rows, ("calibrated P(engage)", counted)))


def column_schema(contract: type[pa.DataFrameModel]) -> TableSchema:
    """The columns of a Pandera contract (name, type, description) as Dagster's TableSchema."""
    return TableSchema(
        columns=[
            TableColumn(name=name, type=str(column.dtype), description=column.description)
            for name, column in contract.to_schema().columns.items()
        ]
    )
