"""Import the user's own CSV/Parquet files as raw tables, through a column mapping.

Only interactions are required. Without an items or users file those tables are derived
from the ids in the interactions, with the documented defaults (docs/DATA.md); columns a
file lacks get the same defaults. Everything is read, mapped and validated — contracts,
foreign keys, no timestamps after `as_of` — before the first byte is written, so a bad
file leaves the warehouse exactly as it was.

A mapping says, per table and contract column, where the value comes from:

    interactions:
      user_id: userId                       # a source column
      ts: {column: timestamp, unit: s}      # epoch seconds (s, ms, us, ns)
      event_type: {constant: rating}        # one value for every row
    items:
      category: {column: genres, split: "|", take: 0}   # first of a '|'-list

A contract column not in the mapping is taken from the source column of the same name, or
else from its default.
"""

from __future__ import annotations

import csv
import gzip
import io
import lzma
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import yaml

from recsys_assets.config import Settings
from recsys_assets.contracts.errors import SAMPLE_ROWS, ContractViolation, Violation
from recsys_assets.contracts.raw import RAW_CONTRACTS, check_foreign_keys, validate_table
from recsys_assets.data.snapshot import RawSnapshotWriter, naive_utc
from recsys_assets.rules.categories import UNKNOWN_CATEGORY
from recsys_assets.warehouse import Warehouse

IMPORTABLE_TABLES = ("interactions", "items", "users")
EPOCH_UNITS = ("s", "ms", "us", "ns")
SPEC_OPTIONS = ("column", "constant", "unit", "format", "split", "take", "values")
INTERACTIONS_PART_ROWS = 2_000_000
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error, zipfile.BadZipFile)
"""What reading a damaged compressed file raises, besides OSError."""
_INT64_LIMIT = 2.0**63
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


class MappingError(ValueError):
    """The column mapping itself is wrong (unknown table, column or option)."""


class SourceFileError(ValueError):
    """A source path that is no readable file (a directory, no permission)."""


@dataclass(frozen=True)
class ColumnSpec:
    """Where one contract column comes from: a source column (transformed) or a constant."""

    column: str | None = None
    constant: Any = None
    unit: str | None = None
    """Epoch unit of a numeric timestamp column: s, ms, us or ns."""
    format: str | None = None
    """strptime format of a text timestamp column (default: ISO 8601)."""
    split: str | None = None
    """Split text on this separator and keep element `take` (e.g. pipe-separated genres)."""
    take: int = 0
    values: dict[Any, Any] | None = None
    """Replace source values (e.g. {1: click, 2: purchase}); others pass through unchanged."""

    def as_dict(self) -> dict[str, Any]:
        """The options that are set (take only with split), as in a YAML mapping."""
        options = {key: value for key, value in asdict(self).items() if value is not None}
        if self.split is None:
            options.pop("take")
        return options

    def describe(self) -> str:
        return repr(self.as_dict())


@dataclass(frozen=True)
class ImportMapping:
    """Per importable table, contract column → ColumnSpec."""

    tables: dict[str, dict[str, ColumnSpec]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<mapping>") -> ImportMapping:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise MappingError(f"{source}: expected a mapping of table → columns at top level")
        tables: dict[str, dict[str, ColumnSpec]] = {}
        for table, columns in data.items():
            _check_table(table, source)
            if not isinstance(columns, dict):
                raise MappingError(f"{source}: {table}: expected a mapping of column → source")
            tables[table] = {
                column: _parse_spec(table, column, spec, source) for column, spec in columns.items()
            }
        return cls(tables)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ImportMapping:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise MappingError(f"cannot read mapping file {path}: {error}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise MappingError(f"mapping file {path} is not valid YAML: {error}") from None
        return cls.from_dict(data, str(path))

    def with_overrides(self, assignments: Sequence[str]) -> ImportMapping:
        """Apply `table.column=source` / `table.column.option=value` flags on top."""
        tables = {table: dict(columns) for table, columns in self.tables.items()}
        for assignment in assignments:
            target, separator, raw = assignment.partition("=")
            parts = target.strip().split(".")
            if not separator or len(parts) not in (2, 3) or not all(parts):
                raise MappingError(
                    f"--map {assignment!r}: use table.column=source_column or "
                    "table.column.option=value (options: constant, unit, format, split, take)"
                )
            table, column = parts[0], parts[1]
            _check_table(table, "--map")
            _check_column(table, column, "--map")
            spec = tables.setdefault(table, {}).get(column, ColumnSpec())
            option = parts[2] if len(parts) == 3 else "column"
            if option == "column":
                spec = replace(spec, column=raw, constant=None)
            elif option == "constant":
                spec = replace(spec, column=None, constant=_scalar(raw))
            elif option == "take":
                spec = replace(spec, take=_integer(raw, f"--map {assignment!r}"))
            elif option in ("unit", "format", "split"):
                spec = replace(spec, **{option: raw})
            else:
                raise MappingError(
                    f"--map {assignment!r}: unknown option {option!r}; flags take column, "
                    "constant, unit, format, split, take (use a YAML mapping for values)"
                )
            tables[table][column] = _checked(table, column, spec, "--map")
        return ImportMapping(tables)

    def for_table(self, table: str) -> dict[str, ColumnSpec]:
        return self.tables.get(table, {})

    def to_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Plain data for the snapshot's lineage."""
        return {
            table: {column: spec.as_dict() for column, spec in columns.items()}
            for table, columns in self.tables.items()
        }


def _check_table(table: Any, source: str) -> None:
    if table not in IMPORTABLE_TABLES:
        raise MappingError(
            f"{source}: cannot map table {table!r}; importable tables: {list(IMPORTABLE_TABLES)}"
        )


def _check_column(table: str, column: Any, source: str) -> None:
    known = list(RAW_CONTRACTS[table].to_schema().columns)
    if column not in known:
        raise MappingError(
            f"{source}: {table}.{column}: not a column of {table}; its columns: {known}"
        )


def _parse_spec(table: str, column: Any, spec: Any, source: str) -> ColumnSpec:
    _check_column(table, column, source)
    if isinstance(spec, str):
        return ColumnSpec(column=spec)
    if not isinstance(spec, dict):
        raise MappingError(
            f"{source}: {table}.{column}: expected a source column name or a mapping "
            f"like {{column: name}} or {{constant: value}}, got {spec!r}"
        )
    unknown = sorted(set(spec) - set(SPEC_OPTIONS))
    if unknown:
        raise MappingError(
            f"{source}: {table}.{column}: unknown option(s) {unknown}; options: {list(SPEC_OPTIONS)}"
        )
    where = f"{source}: {table}.{column}"
    parsed = ColumnSpec(
        column=None if spec.get("column") is None else str(spec["column"]),
        constant=spec.get("constant"),
        unit=spec.get("unit"),
        format=spec.get("format"),
        split=spec.get("split"),
        take=_integer(spec.get("take", 0), where),
        values=spec.get("values"),
    )
    if parsed.values is not None and not isinstance(parsed.values, dict):
        raise MappingError(f"{where}: values must be a mapping of source value → value")
    return _checked(table, column, parsed, source)


def _checked(table: str, column: str, spec: ColumnSpec, source: str) -> ColumnSpec:
    where = f"{source}: {table}.{column}"
    if (spec.column is None) == (spec.constant is None):
        raise MappingError(f"{where}: give exactly one of column or constant ({spec.describe()})")
    if spec.unit is not None and spec.unit not in EPOCH_UNITS:
        raise MappingError(f"{where}: unit {spec.unit!r} is not one of {list(EPOCH_UNITS)}")
    return spec


def _integer(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MappingError(f"{where}: take must be an integer, got {value!r}") from None


def _scalar(text: str) -> Any:
    """A flag's constant typed as YAML would type it: true → bool, 4.5 → float, view → str."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


@dataclass(frozen=True)
class ImportReport:
    """What `import_tables` wrote."""

    snapshot_id: str
    as_of: datetime
    row_counts: dict[str, int]
    sources: dict[str, str]
    """Per table: the file it came from, or how it was derived."""
    elapsed_s: float = 0.0


# -- reading files ---------------------------------------------------------------------


def read_source_file(path: str | Path, table: str) -> pd.DataFrame:
    """A CSV/TSV or Parquet file (optionally compressed) as a frame, or a clear violation."""
    name = str(path)
    lowered = name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        lowered = lowered.removesuffix(suffix)
    if Path(name).is_dir():
        raise SourceFileError(f"{table} file {name} is a directory; give the path of one file")
    try:
        with fsspec.open(name, "rb", compression="infer") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{table} file not found: {name}") from None
    except PermissionError:
        raise SourceFileError(f"{table} file {name} cannot be read: permission denied") from None
    except (*_DECOMPRESSION_ERRORS, OSError) as error:
        # A truncated download, or a name ending in .gz that is not gzip (bz2 says OSError).
        compressed = lowered != name.lower()
        how = f" as {Path(name).suffix}" if compressed else ""
        raise _file_violation(table, name, f"cannot be read{how}: {error}") from None
    if not data:
        raise ContractViolation(
            table, [Violation("(file)", "empty file: no header and no rows", 0)], name
        )
    if lowered.endswith((".parquet", ".pq")):
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise ContractViolation(
                table, [Violation("(file)", f"not a readable Parquet file: {error}", 0)], name
            ) from None
        _require_unique_columns([str(column) for column in frame.columns], table, name)
        return frame
    if not lowered.endswith((".csv", ".tsv", ".txt")):
        raise ValueError(
            f"{table} file {name}: unsupported format; use .csv, .tsv or .parquet "
            "(optionally .gz/.bz2/.xz/.zst compressed)"
        )
    _require_utf8(data, table, name)
    separator = "\t" if lowered.endswith(".tsv") else ","
    header = next(csv.reader(io.StringIO(data.decode("utf-8-sig")), delimiter=separator), [])
    _require_unique_columns(header, table, name)
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=separator, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ContractViolation(
            table, [Violation("(file)", "empty file: no header and no rows", 0)], name
        ) from None
    except pd.errors.ParserError as error:
        raise ContractViolation(
            table, [Violation("(file)", f"not valid CSV: {error}", 1)], name
        ) from None
    if not isinstance(frame.index, pd.RangeIndex):
        # pandas reads the surplus leading fields as an index: every column would shift.
        raise _file_violation(
            table, name, f"data rows have more fields than the header's {len(header)} names"
        )
    return frame


def _file_violation(table: str, name: str, check: str) -> ContractViolation:
    return ContractViolation(table, [Violation("(file)", check, 0)], name)


def _require_unique_columns(columns: list[str], table: str, name: str) -> None:
    """A repeated header name would be read as `name.1` (or one column hide the other),
    so which one a mapping means is ambiguous."""
    positions: dict[str, list[int]] = {}
    for position, column in enumerate(columns, start=1):
        positions.setdefault(column.strip(), []).append(position)
    repeated = {column: where for column, where in positions.items() if len(where) > 1}
    if repeated:
        shown = "; ".join(f"{column!r} at columns {where}" for column, where in repeated.items())
        raise _file_violation(table, name, f"duplicate column names in the header: {shown}")


def _require_utf8(data: bytes, table: str, name: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad_lines = []
        for number, line in enumerate(data.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as line_error:
                bad_lines.append((number, line_error.start, line))
        samples = tuple(
            f"line {number}, byte {start} of the line: {line[:60]!r}"
            for number, start, line in bad_lines[:SAMPLE_ROWS]
        )
        line = data.count(b"\n", 0, error.start) + 1
        check = (
            f"not UTF-8: first invalid byte at offset {error.start} (line {line}); "
            "re-save the file as UTF-8"
        )
        raise ContractViolation(
            table, [Violation("(file)", check, len(bad_lines), samples)], name
        ) from None


# -- mapping a source frame onto a contract ----------------------------------------------


Default = Any | Callable[[pd.Index], pd.Series]


def _map_table(
    table: str,
    source: pd.DataFrame,
    specs: dict[str, ColumnSpec],
    defaults: dict[str, Default],
    origin: str,
) -> pd.DataFrame:
    """The contract's columns built from `source`; raises with every column that failed."""
    contract_columns = RAW_CONTRACTS[table].to_schema().columns
    built: dict[str, pd.Series] = {}
    violations: list[Violation] = []
    for name, contract_column in contract_columns.items():
        spec = specs.get(name)
        if spec is None and name in source.columns:
            spec = ColumnSpec(column=name)
        if spec is None:
            if name not in defaults:
                violations.append(
                    Violation(
                        name,
                        f"missing column: the file has no {name!r} column and the mapping "
                        f"names none (map it with --map {table}.{name}=<source column>)",
                        len(source),
                        (f"columns present: {list(source.columns)[:12]}",),
                    )
                )
                continue
            default = defaults[name]
            built[name] = (
                default(source.index)
                if callable(default)
                else pd.Series([default] * len(source), index=source.index, dtype=object)
            )
            continue
        series, problem = _apply_spec(name, str(contract_column.dtype), spec, source)
        if problem is not None:
            violations.append(problem)
        else:
            built[name] = series
    if violations:
        raise ContractViolation(table, violations, origin)
    return pd.DataFrame(built, index=source.index)


def _apply_spec(
    name: str, dtype: str, spec: ColumnSpec, source: pd.DataFrame
) -> tuple[pd.Series, Violation | None]:
    if spec.constant is not None:
        return pd.Series([spec.constant] * len(source), index=source.index, dtype=object), None
    assert spec.column is not None
    if spec.column not in source.columns:
        return pd.Series(dtype=object), Violation(
            name,
            f"missing column: the mapping reads source column {spec.column!r}, "
            "which the file does not have",
            len(source),
            (f"columns present: {list(source.columns)[:12]}",),
        )
    series = source[spec.column]
    if spec.split is not None:
        series = series.astype("str").str.split(spec.split, regex=False).str[spec.take]
        series = series.where(source[spec.column].notna(), None)
    if spec.values is not None:
        series = series.map(spec.values).where(series.isin(list(spec.values)), series)
    if dtype.startswith("datetime"):
        return _timestamps(name, series, spec)
    if dtype == "bool":
        return _booleans(name, series)
    if dtype.startswith("int"):
        return _integers(name, series)
    if dtype.startswith("float"):
        return _finite(name, series)
    return series, None


def _integers(name: str, series: pd.Series) -> tuple[pd.Series, Violation | None]:
    """Whole numbers within int64: the contract's cast would truncate 1.9 to 1 (merging two
    users into one) and wrap ids past 2^63. Text that is no number is the contract's to report."""
    numbers = pd.to_numeric(series, errors="coerce").astype("float64")
    out_of_range = numbers.notna() & ~(numbers.abs() < _INT64_LIMIT)  # inf included
    fractional = numbers.notna() & ~out_of_range & (numbers % 1 != 0)
    if fractional.any():
        check = "not a whole number (the fraction would be truncated, merging distinct ids)"
        return series, _rows_violation(name, check, series, fractional)
    if out_of_range.any():
        return series, _rows_violation(name, "outside the int64 range", series, out_of_range)
    return series, None


def _finite(name: str, series: pd.Series) -> tuple[pd.Series, Violation | None]:
    """inf/-inf would pass as a float and break every score and mean computed from it."""
    numbers = pd.to_numeric(series, errors="coerce")
    infinite = pd.Series(np.isinf(numbers.to_numpy(dtype="float64")), index=series.index)
    if infinite.any():
        return series, _rows_violation(name, "not a finite number (inf)", series, infinite)
    return series, None


def _timestamps(
    name: str, series: pd.Series, spec: ColumnSpec
) -> tuple[pd.Series, Violation | None]:
    """Naive UTC timestamps from epoch numbers, text, or (tz-aware) datetimes."""
    if pd.api.types.is_datetime64_any_dtype(series):
        if getattr(series.dt, "tz", None) is not None:
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        return series, None
    if spec.unit is not None:
        numbers = pd.to_numeric(series, errors="coerce")
        converted = pd.to_datetime(numbers, unit=spec.unit, errors="coerce")  # out of range: NaT
        bad = converted.isna() & series.notna()
        check = f"not a number of {spec.unit} since the epoch (years 1678-2261)"
    elif pd.api.types.is_numeric_dtype(series):
        return series, Violation(
            name,
            f"numeric timestamps need a unit: map it as {{column: {spec.column}, unit: s}} "
            f"(or --map <table>.{name}.unit=s); units: {list(EPOCH_UNITS)}",
            len(series),
            tuple(repr(value) for value in series.head(SAMPLE_ROWS)),
        )
    else:
        converted = pd.to_datetime(
            series, format=spec.format or "ISO8601", utc=True, errors="coerce"
        ).dt.tz_localize(None)
        bad = converted.isna() & series.notna()
        check = f"cannot parse as a timestamp (format {spec.format or 'ISO 8601'})"
    if bad.any():
        return series, _rows_violation(name, check, series, bad)
    return converted, None


def _booleans(name: str, series: pd.Series) -> tuple[pd.Series, Violation | None]:
    """true/false, yes/no, 1/0 (any case); anything else is an error, never silently True."""
    if pd.api.types.is_bool_dtype(series):
        return series, None
    text = series.astype("str").str.strip().str.lower()
    truth = text.isin(_TRUE)
    bad = ~(truth | text.isin(_FALSE)) | series.isna()
    if bad.any():
        return series, _rows_violation(name, "not a boolean (true/false, yes/no, 1/0)", series, bad)
    return truth, None


def _rows_violation(name: str, check: str, series: pd.Series, bad: pd.Series) -> Violation:
    samples = tuple(
        f"row {index}: {value!r}" for index, value in series[bad].head(SAMPLE_ROWS).items()
    )
    return Violation(name, check, int(bad.sum()), samples)


# -- defaults for derived tables and missing columns -------------------------------------


def _item_defaults(
    interactions: pd.DataFrame, ids: pd.Series, as_of: datetime
) -> dict[str, Default]:
    # Creation time unknown: an interacted item is treated as existing from the start of the
    # data, not from its own first interaction; that would make "new item" mean "about to be
    # engaged with" (an item's first positive at age 0), a label leak for every age feature.
    interacted = interactions["item_id"].unique()
    data_start = pd.Series(interactions["ts"].min(), index=interacted)
    return {
        "item_type": "item",
        "title": None,
        "category": UNKNOWN_CATEGORY,
        # Each item its own creator: one shared placeholder would make every item the same
        # creator, and the slate policy's max_per_creator would cut every list to that cap.
        "creator_id": lambda index: _own_creator(ids, index),
        "regions": "*",
        "status": "active",
        "policy_state": "approved",
        "stock": -1,
        "is_sponsored": False,
        "campaign_id": None,
        "campaign_end": lambda index: pd.Series(pd.NaT, index=index, dtype="datetime64[ns]"),
        "risk_level": "low",
        "tenant_id": None,
        "required_role": None,
        "case_state": None,
        "created_at": lambda index: _seen(ids, data_start, index, as_of),
    }


def _user_defaults(
    interactions: pd.DataFrame, ids: pd.Series, as_of: datetime, settings: Settings
) -> dict[str, Default]:
    times = interactions.groupby("user_id")["ts"]
    first_seen, last_seen = times.min(), times.max()
    return {
        "region": settings.regions[0],
        "locale": "en-US",
        "tenant_id": None,
        "actor_role": None,
        "consent_personalization": True,
        "email_subscribed": False,
        "push_enabled": False,
        "timezone": "UTC",
        "quiet_hours_start": 22,
        "quiet_hours_end": 7,
        "created_at": lambda index: _seen(ids, first_seen, index, as_of),
        "last_active_at": lambda index: _seen(ids, last_seen, index, as_of),
    }


def _own_creator(ids: pd.Series, index: pd.Index) -> pd.Series:
    """Per row of `ids`: `item:<item_id>`."""
    numeric = pd.to_numeric(ids, errors="coerce")
    # A bad id (fractional, out of range) is reported as such; it gets no creator here.
    numeric = numeric.where((numeric % 1 == 0) & (numeric.abs() < _INT64_LIMIT))
    numeric = numeric.astype("Int64").astype(str)
    return pd.Series(("item:" + numeric).to_numpy(), index=index)


def _seen(ids: pd.Series, seen: pd.Series, index: pd.Index, as_of: datetime) -> pd.Series:
    """Per row of `ids`: its time in `seen` (indexed by id), else as_of (never seen)."""
    numeric = pd.to_numeric(ids, errors="coerce")
    looked_up = pd.Series(numeric.map(seen).to_numpy(), index=index)
    return looked_up.fillna(pd.Timestamp(as_of)).astype("datetime64[ns]")


def _ids_frame(column: str, values: pd.Series) -> pd.DataFrame:
    unique = pd.Series(pd.unique(values), name=column).sort_values(ignore_index=True)
    return unique.to_frame()


# -- the import --------------------------------------------------------------------------


def import_tables(
    warehouse: Warehouse,
    *,
    interactions: str | Path,
    items: str | Path | None = None,
    users: str | Path | None = None,
    mapping: ImportMapping | None = None,
    settings: Settings,
    as_of: datetime | None = None,
) -> ImportReport:
    """Read, map and validate the files, then write them as the warehouse's raw snapshot.

    `as_of` (default: now, UTC) is the moment the data describes: no timestamp may be later.
    Raises ContractViolation (table, column, count, samples) or MappingError before writing.
    """
    started = time.perf_counter()
    mapping = mapping or ImportMapping()
    moment = naive_utc(as_of) if as_of is not None else datetime.now(UTC).replace(tzinfo=None)
    regions = tuple(settings.regions)
    origins = {"interactions": str(interactions)}

    source = read_source_file(interactions, "interactions")
    mapped = _map_table(
        "interactions",
        source,
        mapping.for_table("interactions"),
        {"event_type": "view", "value": 1.0},
        origins["interactions"],
    )
    events = validate_table(
        "interactions", mapped, source=origins["interactions"], now=moment, regions=regions
    )

    if items is not None:
        origins["items"] = str(items)
        item_source = read_source_file(items, "items")
    else:
        origins["items"] = "derived from interactions.item_id"
        item_source = _ids_frame("item_id", events["item_id"])
    item_specs = _specs_for("items", mapping, derived=items is None)
    item_ids = _id_column(item_source, item_specs.get("item_id"), "item_id")
    item_frame = _map_table(
        "items",
        item_source,
        item_specs,
        _item_defaults(events, item_ids, moment),
        origins["items"],
    )

    if users is not None:
        origins["users"] = str(users)
        user_source = read_source_file(users, "users")
    else:
        origins["users"] = "derived from interactions.user_id"
        user_source = _ids_frame("user_id", events["user_id"])
    user_specs = _specs_for("users", mapping, derived=users is None)
    user_ids = _id_column(user_source, user_specs.get("user_id"), "user_id")
    user_frame = _map_table(
        "users",
        user_source,
        user_specs,
        _user_defaults(events, user_ids, moment, settings),
        origins["users"],
    )
    tables = {
        "users": validate_table(
            "users", user_frame, source=origins["users"], now=moment, regions=regions
        ),
        "items": validate_table(
            "items", item_frame, source=origins["items"], now=moment, regions=regions
        ),
        "interactions": events,
    }
    check_foreign_keys(tables, sources=origins)

    writer = RawSnapshotWriter(warehouse)
    writer.begin()
    writer.write_part("users", tables["users"])
    writer.write_part("items", tables["items"])
    for start in range(0, len(events), INTERACTIONS_PART_ROWS):
        writer.write_part("interactions", events.iloc[start : start + INTERACTIONS_PART_ROWS])
    snapshot = writer.finish(
        {
            "source": "import",
            "scale": None,
            "seed": None,
            "as_of": moment.isoformat(),
            "files": origins,
            "mapping": mapping.to_dict(),
            "interactions_ts_range": [
                events["ts"].min().isoformat(),
                events["ts"].max().isoformat(),
            ],
        }
    )
    return ImportReport(
        snapshot_id=snapshot["snapshot_id"],
        as_of=moment,
        row_counts=dict(writer.row_counts),
        sources={
            **origins,
            **{table: "empty" for table in ("exposures", "user_controls", "editorial")},
        },
        elapsed_s=time.perf_counter() - started,
    )


def _specs_for(table: str, mapping: ImportMapping, *, derived: bool) -> dict[str, ColumnSpec]:
    """A derived table has no file to read columns from: only constants can apply."""
    specs = mapping.for_table(table)
    reading = sorted(column for column, spec in specs.items() if spec.column is not None)
    if derived and reading:
        raise MappingError(
            f"the mapping reads {table} columns {reading} from a file, but no {table} file "
            f"was given: pass --{table} FILE, or keep only constants for {table}"
        )
    return specs


def _id_column(source: pd.DataFrame, spec: ColumnSpec | None, name: str) -> pd.Series:
    """The raw id values of a parent table, for looking up first/last interaction times."""
    column = spec.column if spec is not None and spec.column is not None else name
    if column in source.columns:
        return source[column]
    return pd.Series([None] * len(source), index=source.index, dtype=object)
