"""Import of the user's files: mappings, defaults, and bad input that changes nothing."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from recsys_assets.config import load_settings
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.contracts import ContractViolation, check_foreign_keys, validate_table
from recsys_assets.contracts.raw import OPTIONAL_TABLES, RAW_CONTRACTS
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.importer import ImportMapping, MappingError, import_tables
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.realdata import import_into, ml100k

SETTINGS = load_settings(DEFAULT_CONFIG_PATH)
AS_OF = datetime(2026, 11, 20)
RATINGS = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,3,4.0,964981247\n"
    "2,1,5.0,964982224\n"
    "3,2,3.5,1445714835\n"
)
MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children\n"
    "2,Jumanji (1995),Adventure|Children|Fantasy\n"
    "3,Grumpier Old Men (1995),Comedy|Romance\n"
    "4,Heat (1995),Action|Crime|Thriller\n"
)
MOVIELENS_MAPPING = """
interactions:
  user_id: userId
  item_id: movieId
  value: rating
  ts: {column: timestamp, unit: s}
  event_type: {constant: rating}
items:
  item_id: movieId
  title: title
  category: {column: genres, split: "|", take: 0}
"""
MOVIELENS_FLAGS = [
    "interactions.user_id=userId",
    "interactions.item_id=movieId",
    "interactions.value=rating",
    "interactions.ts=timestamp",
    "interactions.ts.unit=s",
    "interactions.event_type.constant=rating",
    "items.item_id=movieId",
    "items.category=genres",
    "items.category.split=|",
    "items.category.take=0",
]


def _write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def _fingerprint(warehouse: Warehouse) -> dict[str, bytes]:
    return {
        path: warehouse.fs.cat_file(path)
        for path in warehouse.fs.find(warehouse.root)
        if not path.endswith(".lock")
    }


def test_movielens_files_import_with_a_yaml_mapping(warehouse: Warehouse, tmp_path: Path) -> None:
    mapping = ImportMapping.from_yaml(_write(tmp_path, "mapping.yaml", MOVIELENS_MAPPING))
    report = import_tables(
        warehouse,
        interactions=_write(tmp_path, "ratings.csv", RATINGS),
        items=_write(tmp_path, "movies.csv", MOVIES),
        mapping=mapping,
        settings=SETTINGS,
        as_of=AS_OF,
    )
    assert report.row_counts == {
        "users": 3,
        "items": 4,
        "interactions": 4,
        "exposures": 0,
        "user_controls": 0,
        "editorial": 0,
    }
    tables = {table: read_raw(warehouse, table) for table in RAW_CONTRACTS}
    for table, frame in tables.items():
        validate_table(table, frame, now=AS_OF, regions=SETTINGS.regions)
    check_foreign_keys(tables, sources={})

    items = tables["items"].set_index("item_id")
    assert items["category"].to_dict() == {1: "Adventure", 2: "Adventure", 3: "Comedy", 4: "Action"}
    assert items.loc[4, "title"] == "Heat (1995)"
    assert (items["status"] == "active").all() and (items["regions"] == "*").all()
    # No creation time in the file: interacted items exist from the data's start (item 2's
    # first rating is in 2015, yet it dates from the first rating of all).
    data_start = pd.Timestamp("2000-07-30 18:20:47")
    assert items.loc[[1, 2, 3], "created_at"].eq(data_start).all()
    assert items.loc[4, "created_at"] == pd.Timestamp(AS_OF)  # never interacted with

    events = tables["interactions"]
    assert events["event_type"].eq("rating").all()
    assert events["value"].tolist() == [4.0, 4.0, 5.0, 3.5]
    assert events["ts"].iloc[0] == pd.Timestamp(964982703, unit="s")

    users = tables["users"].set_index("user_id")
    assert users.index.tolist() == [1, 2, 3]
    assert (users["region"] == SETTINGS.regions[0]).all()
    assert users["consent_personalization"].all() and not users["email_subscribed"].any()
    assert users.loc[1, "last_active_at"] == pd.Timestamp(964982703, unit="s")
    for table in OPTIONAL_TABLES:
        assert tables[table].empty
        assert list(tables[table].columns) == list(RAW_CONTRACTS[table].to_schema().columns)

    snapshot = read_snapshot(warehouse)
    assert snapshot["source"] == "import" and snapshot["as_of"] == AS_OF.isoformat()
    assert snapshot["mapping"]["items"]["category"] == {"column": "genres", "split": "|", "take": 0}


def test_flags_alone_give_the_same_tables_as_the_yaml(tmp_path: Path) -> None:
    ratings = _write(tmp_path, "ratings.csv", RATINGS)
    movies = _write(tmp_path, "movies.csv", MOVIES)
    results = []
    for name, mapping in (
        ("yaml", ImportMapping.from_dict(yaml.safe_load(MOVIELENS_MAPPING))),
        ("flags", ImportMapping().with_overrides(MOVIELENS_FLAGS)),
    ):
        warehouse = Warehouse((tmp_path / name).as_uri())
        import_tables(
            warehouse,
            interactions=ratings,
            items=movies,
            mapping=mapping,
            settings=SETTINGS,
            as_of=AS_OF,
        )
        results.append({table: read_raw(warehouse, table) for table in ("users", "items")})
    for table in ("users", "items"):
        pd.testing.assert_frame_equal(results[0][table], results[1][table])


def test_files_in_contract_shape_need_no_mapping(
    local_warehouse: Warehouse, tmp_path: Path
) -> None:
    events = pd.DataFrame(
        {
            "user_id": [7, 8, 8],
            "item_id": [70, 70, 71],
            "event_type": ["view", "purchase", "click"],
            "ts": pd.to_datetime(
                ["2026-11-01 10:00", "2026-11-02 10:00", "2026-11-03 10:00"]
            ).tz_localize("Europe/Berlin"),
        }
    )
    events_path = tmp_path / "events.parquet"
    events.to_parquet(events_path)
    users = _write(
        tmp_path,
        "users.csv",
        "user_id,region,consent_personalization,email_subscribed,created_at\n"
        "7,eu,yes,TRUE,2025-01-01T00:00:00Z\n"
        "8,na,no,0,2025-06-01 12:00:00\n"
        "9,apac,1,false,2025-07-01\n",
    )
    import_tables(
        local_warehouse,
        interactions=events_path,
        users=users,
        mapping=ImportMapping().with_overrides(["items.item_type.constant=product"]),
        settings=SETTINGS,
        as_of=AS_OF,
    )
    stored = read_raw(local_warehouse, "interactions")
    assert stored["value"].tolist() == [1.0, 1.0, 1.0]
    assert stored["ts"].iloc[0] == pd.Timestamp("2026-11-01 09:00")  # Berlin → naive UTC
    users_table = read_raw(local_warehouse, "users").set_index("user_id")
    assert users_table["consent_personalization"].tolist() == [True, False, True]
    assert users_table["email_subscribed"].tolist() == [True, False, False]
    assert users_table.loc[9, "last_active_at"] == pd.Timestamp(AS_OF)  # no interactions
    assert (read_raw(local_warehouse, "items")["item_type"] == "product").all()


BAD_INPUTS = {
    "missing column": (
        {"interactions": "userId,movieId,rating\n1,1,4.0\n2,1,5.0\n"},
        ("interactions", "ts", "missing column", 2, "columns present"),
    ),
    "wrong type": (
        {"interactions": RATINGS.replace("\n2,1,5.0", "\nabc,1,5.0")},
        ("interactions", "user_id", "wrong type", 1, "row 2: 'abc'"),
    ),
    "duplicate keys": (
        {"items": MOVIES + "3,Again,Drama\n"},
        ("items", "item_id", "duplicate key", 2, "row 2: 3"),
    ),
    "unknown foreign keys": (
        {"interactions": RATINGS + "4,99,2.0,964982703\n"},
        ("interactions", "item_id", "unknown items.item_id", 1, "99"),
    ),
    "timestamps in the future": (
        {"interactions": RATINGS + "4,1,2.0,1796000000\n"},
        ("interactions", "ts", "timestamp in the future", 1, "2026-11-30"),
    ),
    "empty file": (
        {"interactions": ""},
        ("interactions", "(file)", "empty file", 0, None),
    ),
    "header only": (
        {"interactions": "userId,movieId,rating,timestamp\n"},
        ("interactions", "(table)", "empty table", 0, None),
    ),
    "non-UTF-8": (
        {"items": MOVIES.encode() + b"5,Caf\xe9 (1995),Drama\n"},
        ("items", "(file)", f"offset {len(MOVIES.encode()) + 5}", 1, "line 6"),
    ),
    "numeric timestamp without unit": (
        {"mapping": MOVIELENS_MAPPING.replace(", unit: s", "")},
        ("interactions", "ts", "need a unit", 4, None),
    ),
    "unparseable text timestamp": (
        {"interactions": "userId,movieId,rating,timestamp\n1,1,4,2026-11-01\n2,2,3,yesterday\n",
         "mapping": MOVIELENS_MAPPING.replace(", unit: s", "")},
        ("interactions", "ts", "cannot parse", 1, "row 1: 'yesterday'"),
    ),
    "unknown user in users file": (
        {"users": "user_id,region\n1,na\n2,eu\n"},
        ("interactions", "user_id", "unknown users.user_id", 1, "3"),
    ),
    "unknown region": (
        {"users": "user_id,region\n1,na\n2,mars\n3,eu\n"},
        ("users", "region", "region not configured", 1, "mars"),
    ),
    "not a boolean": (
        {"users": "user_id,push_enabled\n1,yes\n2,maybe\n3,no\n"},
        ("users", "push_enabled", "not a boolean", 1, "row 1: 'maybe'"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_problem_and_leaves_the_warehouse_unchanged(
    case: str, tiny_warehouse: Warehouse, tmp_path: Path
) -> None:
    overrides, (table, column, check, count, sample) = BAD_INPUTS[case]
    files = {
        "interactions": RATINGS,
        "items": MOVIES,
        "mapping": MOVIELENS_MAPPING,
        **overrides,
    }
    paths = {name: _write(tmp_path, f"{name}.csv", content) for name, content in files.items()}
    before = _fingerprint(tiny_warehouse)
    with pytest.raises(ContractViolation) as error:
        import_tables(
            tiny_warehouse,
            interactions=paths["interactions"],
            items=paths["items"],
            users=paths.get("users"),
            mapping=ImportMapping.from_yaml(paths["mapping"]),
            settings=SETTINGS,
            as_of=AS_OF,
        )
    assert error.value.table == table
    matching = [v for v in error.value.violations if v.column == column]
    assert matching, str(error.value)
    violation = matching[0]
    assert check in violation.check, str(error.value)
    assert violation.count == count, str(error.value)
    if sample is not None:
        assert any(sample in text for text in violation.samples), str(error.value)
    assert error.value.source.endswith(".csv")
    assert _fingerprint(tiny_warehouse) == before
    assert read_snapshot(tiny_warehouse)["source"] == "seed"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"exposures": {"user_id": "u"}}, "cannot map table 'exposures'"),
        ({"items": {"colour": "c"}}, "items.colour: not a column of items"),
        (
            {"items": {"title": {"column": "t", "constant": "x"}}},
            "exactly one of column or constant",
        ),
        ({"interactions": {"ts": {"column": "t", "unit": "days"}}}, "unit 'days' is not one of"),
        ({"interactions": {"ts": {"column": "t", "zone": "UTC"}}}, "unknown option(s) ['zone']"),
        ({"interactions": {"value": 1}}, "{constant: value}"),
    ],
)
def test_mapping_mistakes_are_refused_with_their_location(mapping: dict, message: str) -> None:
    with pytest.raises(MappingError) as error:
        ImportMapping.from_dict(mapping, "my.yaml")
    assert message in str(error.value)
    assert "my.yaml" in str(error.value)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("interactions.user_id", "use table.column=source_column"),
        ("interactions.ts.zone=UTC", "unknown option 'zone'"),
        ("items.category.take=first", "take must be an integer"),
        ("users.nickname=nick", "users.nickname: not a column of users"),
    ],
)
def test_flag_mistakes_are_refused(flag: str, message: str) -> None:
    with pytest.raises(MappingError) as error:
        ImportMapping().with_overrides([flag])
    assert message in str(error.value)


def test_unreadable_sources_are_reported(local_warehouse: Warehouse, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="interactions file not found"):
        import_tables(
            local_warehouse, interactions=tmp_path / "nope.csv", settings=SETTINGS, as_of=AS_OF
        )
    with pytest.raises(ValueError, match="unsupported format"):
        import_tables(
            local_warehouse,
            interactions=_write(tmp_path, "ratings.json", "{}"),
            settings=SETTINGS,
            as_of=AS_OF,
        )
    with pytest.raises(ContractViolation, match="not a readable Parquet file"):
        import_tables(
            local_warehouse,
            interactions=_write(tmp_path, "ratings.parquet", b"PAR1 not really"),
            settings=SETTINGS,
            as_of=AS_OF,
        )
    assert not local_warehouse.exists("raw")


def test_imported_items_are_not_created_at_their_first_interaction(tmp_path: Path) -> None:
    """Regression (label leak): without a creation time in the file, an item used to be created
    at its own first interaction, so its first positive always came at age 0."""
    files = ml100k()
    url = (tmp_path / "warehouse").as_uri()
    import_into(url, files.interactions, files.mapping, items=files.items)
    warehouse = Warehouse(url)
    events = read_raw(warehouse, "interactions")
    items = read_raw(warehouse, "items").set_index("item_id")
    first = events.groupby("item_id")["ts"].min()
    data_start = events["ts"].min()
    created = items.loc[first.index, "created_at"]
    at_first_interaction = (created == first) & (first != data_start)
    assert not at_first_interaction.any(), first[at_first_interaction].head().to_dict()
    assert created.eq(data_start).all()
