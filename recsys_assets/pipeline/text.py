"""Text columns of the per-candidate tables as dictionary codes.

A shard of scored candidates repeats three item types, a few hundred categories, a few
thousand creators, a few hundred provenance labels and one model version across 1.5M rows.
As Arrow strings, every cell is copied when rows are gathered and hashed again when Parquet
dictionary-encodes the column. Coded (a pandas Categorical in memory, an Arrow dictionary
array on the way to Parquet, dictionary pages on disk and back), each cell costs an integer.
On a 1.49M-row scored part: written in 0.44 s instead of 0.64 s, read back in 0.17 s
instead of 0.47 s, 27% smaller (with float32 scores).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from recsys_assets.pipeline.feature_tables import take_or_fill


def coded(values: pd.Series, at: np.ndarray) -> pd.Categorical:
    """`values[at]` as a Categorical, missing where `at` is -1. `values` is the small
    (catalog-sized) column; it is coded once, and each row gathers only its code."""
    categorical = values.astype("category").array
    assert isinstance(categorical, pd.Categorical)
    return pd.Categorical.from_codes(
        take_or_fill(categorical.codes, at, fill=-1), dtype=categorical.dtype
    )


def constant(value: str, rows: int) -> pd.Categorical:
    """`value` on every one of `rows` rows (lineage: model version, run id, …)."""
    return pd.Categorical.from_codes(np.zeros(rows, dtype=np.int8), categories=[value])


def plain_text(series: pd.Series) -> pd.Series:
    """A coded text column as plain text (str), decoded by Arrow without a Python object per
    row (pandas' own `astype(str)` took 0.37 s for 3M rows, this 0.03 s); other columns are
    returned as they are."""
    if not isinstance(series.dtype, pd.CategoricalDtype):
        return series
    codes = series.cat.codes.to_numpy()
    dictionary = pa.array(series.cat.categories.astype(str), type=pa.large_string())
    indices = pa.array(codes, mask=codes < 0)
    decoded = pa.DictionaryArray.from_arrays(indices, dictionary).dictionary_decode()
    return pd.Series(decoded.to_pandas(), index=series.index, name=series.name)


def plain_text_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every coded text column decoded (`plain_text`)."""
    coded_columns = [c for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)]
    if not coded_columns:
        return frame
    return frame.assign(**{column: plain_text(frame[column]) for column in coded_columns})
