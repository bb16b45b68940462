"""Contract violations that tell the user what is wrong, where, and with examples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pandera.pandas as pa

SAMPLE_ROWS = 5


@dataclass(frozen=True)
class Violation:
    """One broken rule: which column, which check, how many rows, a few samples."""

    column: str
    check: str
    count: int
    samples: tuple[str, ...] = ()

    def describe(self) -> str:
        shown = ", ".join(self.samples)
        return f"column {self.column!r}: {self.check} — {self.count} row(s), e.g. [{shown}]"


@dataclass
class ContractViolation(ValueError):
    """A table broke its contract; nothing downstream may run on it."""

    table: str
    violations: list[Violation] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" (from {self.source})" if self.source else ""
        lines = [f"table {self.table!r}{where} breaks its contract:"]
        lines += [f"  - {violation.describe()}" for violation in self.violations]
        return "\n".join(lines)


def violations_from_pandera(error: pa.errors.SchemaErrors, frame: pd.DataFrame) -> list[Violation]:
    """Group Pandera's failure cases into one Violation per (column, check).

    A missing column is reported under its own name (Pandera files it under the schema's);
    a column that cannot be converted to its type reports only that, not the follow-on
    dtype and value-check failures that the failed conversion causes.
    """
    cases = error.failure_cases.copy()
    cases["column"] = cases["column"].fillna("(table)").astype(str)
    cases["check"] = cases["check"].astype(str)
    found: list[Violation] = []
    missing = cases["check"].str.startswith("column_in_dataframe")
    for name in cases.loc[missing, "failure_case"].astype(str):
        present = ", ".join(map(str, frame.columns[:12]))
        found.append(
            Violation(name, "missing column", len(frame), (f"columns present: [{present}]",))
        )
    cases = cases[~missing]
    row_checks = (cases["schema_context"] == "DataFrameSchema") & ~cases["check"].str.startswith(
        "column_in_"
    )
    for check, group in cases[row_checks].groupby("check", sort=True):
        found.append(_row_check_violation(check, group, frame))
    cases = cases[~row_checks]
    unconvertible = set(cases.loc[cases["check"].str.startswith("coerce_dtype"), "column"])
    cases = cases[
        ~cases["column"].isin(unconvertible) | cases["check"].str.startswith("coerce_dtype")
    ]
    for (column, check), group in cases.groupby(["column", "check"], sort=True):
        samples = tuple(_sample(group, frame, column))
        count = len(group)
        found.append(
            Violation(column=column, check=_readable_check(check), count=count, samples=samples)
        )
    return found


def _row_check_violation(check: str, group: pd.DataFrame, frame: pd.DataFrame) -> Violation:
    """A rule across columns fails once per row, not once per column of that row."""
    rows = pd.unique(group["index"].dropna())
    key = frame.columns[0]
    samples = tuple(
        f"row {int(row)}: {key}={_plain(frame.at[row, key])!r}"
        if row in frame.index
        else f"row {row}"
        for row in rows[:SAMPLE_ROWS]
    )
    return Violation("(row)", check, len(rows), samples)


def _plain(value: object) -> object:
    """numpy scalars as Python values, so samples read `11`, not `np.int64(11)`."""
    return value.item() if isinstance(value, np.generic) else value


def _sample(group: pd.DataFrame, frame: pd.DataFrame, column: str) -> list[str]:
    out: list[str] = []
    for _, case in group.head(SAMPLE_ROWS).iterrows():
        index = case.get("index")
        value = case.get("failure_case")
        if pd.notna(index) and column in frame.columns:
            out.append(f"row {int(index)}: {value!r}")
        else:
            out.append(repr(value))
    return out


def _readable_check(check: str) -> str:
    if check.startswith("column_in_dataframe"):
        return "missing column"
    if check.startswith("column_in_schema"):
        return "unexpected column"
    if check.startswith("coerce_dtype") or check.startswith("dtype"):
        wanted = check.split("(", 1)[-1].rstrip(")").strip("'")
        return f"wrong type: cannot convert to {wanted}"
    if check == "field_uniqueness" or check.startswith("unique"):
        return "duplicate key"
    if check == "not_nullable":
        return "missing value (null)"
    return check
