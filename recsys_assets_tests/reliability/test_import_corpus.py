"""A bad-input corpus for `recsys import`: every case is refused with one clear line naming
the file (or flag) and the problem, exit code 2, and the warehouse is byte-identical after.

Counts are reported in docs/DATA.md ("Bad input").
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from recsys_assets import cli
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR

GOOD = "user_id,item_id,ts,value\n1,10,2026-01-01T00:00:00,1.0\n2,11,2026-01-02T00:00:00,2.0\n"
ITEMS = "item_id,category\n10,a\n11,b\n"
USERS = "user_id,region\n1,na\n2,eu\n"
AS_OF = ("--as-of", "2026-11-20")
Maker = Callable[[Path], list[str]]
"""Writes the case's files under a folder; returns the `recsys import` arguments."""


@dataclass(frozen=True)
class Case:
    name: str
    make: Maker
    expected: tuple[str, ...]
    """Fragments the one error line must contain (the file or flag, and the problem)."""


def _file(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    return write


def interactions(name: str, data: bytes | str, *extra: str) -> Maker:
    return lambda folder: ["--interactions", str(_file(name, data)(folder)), *extra]


def with_items(data: bytes | str, name: str = "items.csv") -> Maker:
    def make(folder: Path) -> list[str]:
        good = _file("good.csv", GOOD)(folder)
        return ["--interactions", str(good), "--items", str(_file(name, data)(folder))]

    return make


def with_users(data: bytes | str, name: str = "users.csv") -> Maker:
    def make(folder: Path) -> list[str]:
        good = _file("good.csv", GOOD)(folder)
        return ["--interactions", str(good), "--users", str(_file(name, data)(folder))]

    return make


def with_mapping(text: str, *extra: str) -> Maker:
    def make(folder: Path) -> list[str]:
        good = _file("good.csv", GOOD)(folder)
        mapping = _file("mapping.yaml", text)(folder)
        return ["--interactions", str(good), "--mapping", str(mapping), *extra]

    return make


def with_flags(*flags: str) -> Maker:
    def make(folder: Path) -> list[str]:
        good = _file("good.csv", GOOD)(folder)
        return ["--interactions", str(good), *[a for flag in flags for a in ("--map", flag)]]

    return make


def directory(name: str) -> Maker:
    def make(folder: Path) -> list[str]:
        (folder / name).mkdir()
        return ["--interactions", str(folder / name)]

    return make


def parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


GOOD_PARQUET = parquet(pd.read_csv(io.StringIO(GOOD)))
ROW = "user_id,item_id,ts,value\n"
CASES = [
    # -- numbers that would be silently changed
    Case("fractional user id", interactions("f.csv", ROW + "1.9,10,2026-01-01,1\n"), ("f.csv", "user_id", "not a whole number", "row 0")),
    Case("fractional item id", interactions("f.csv", ROW + "1,10.5,2026-01-01,1\n"), ("item_id", "not a whole number")),
    Case("fractional id in parquet", interactions("f.parquet", parquet(pd.DataFrame({"user_id": [1.9], "item_id": [10], "ts": ["2026-01-01"]}))), ("f.parquet", "user_id", "not a whole number")),
    Case("id beyond int64", interactions("f.csv", ROW + "99999999999999999999999,10,2026-01-01,1\n"), ("user_id", "int64")),
    Case("infinite rating", interactions("f.csv", ROW + "1,10,2026-01-01,inf\n"), ("f.csv", "value", "not a finite number", "row 0")),
    Case("minus infinite rating", interactions("f.csv", ROW + "1,10,2026-01-01,-inf\n"), ("value", "not a finite number")),
    Case("infinite id", interactions("f.csv", ROW + "inf,10,2026-01-01,1\n"), ("user_id", "int64")),
    Case("negative id", interactions("f.csv", ROW + "-1,10,2026-01-01,1\n"), ("user_id",)),
    Case("text id", interactions("f.csv", ROW + "abc,10,2026-01-01,1\n"), ("user_id",)),
    Case("missing id", interactions("f.csv", ROW + ",10,2026-01-01,1\n"), ("user_id",)),
    Case("unknown event type", interactions("f.csv", "user_id,item_id,ts,event_type\n1,10,2026-01-01,like\n"), ("event_type",)),
    # -- header problems
    Case("duplicate header column", interactions("d.csv", "user_id,item_id,user_id,ts\n1,10,2,2026-01-01\n"), ("d.csv", "duplicate column names", "'user_id' at columns [1, 3]")),
    Case("duplicate header in tsv", interactions("d.tsv", "user_id\titem_id\tts\tts\n1\t10\t2026-01-01\t2026-01-01\n"), ("d.tsv", "duplicate column names", "'ts'")),
    Case("duplicate header in items", with_items("item_id,category,category\n10,a,b\n11,b,c\n"), ("items.csv", "duplicate column names", "'category'")),
    Case("missing user_id column", interactions("m.csv", "item_id,ts\n10,2026-01-01\n"), ("m.csv", "user_id", "missing column")),
    Case("header only", interactions("h.csv", ROW), ("h.csv", "empty table")),
    # -- files that are not what their name says
    Case("truncated gzip", interactions("t.csv.gz", gzip.compress(GOOD.encode())[:25]), ("t.csv.gz", "cannot be read as .gz")),
    Case("not gzip at all", interactions("n.csv.gz", GOOD), ("n.csv.gz", "cannot be read as .gz", "Not a gzipped file")),
    Case("truncated bz2", interactions("t.csv.bz2", bz2.compress(GOOD.encode())[:30]), ("t.csv.bz2", "cannot be read as .bz2")),
    Case("not bz2 at all", interactions("n.csv.bz2", GOOD), ("n.csv.bz2", "cannot be read as .bz2")),
    Case("truncated xz", interactions("t.csv.xz", lzma.compress(GOOD.encode())[:30]), ("t.csv.xz", "cannot be read as .xz")),
    Case("gzip of garbage", interactions("g.csv.gz", gzip.compress(b"\xff\xfe\x00garbage")), ("g.csv.gz", "not UTF-8")),
    Case("garbage parquet", interactions("g.parquet", b"PAR1 this is not parquet PAR1"), ("g.parquet", "not a readable Parquet file")),
    Case("truncated parquet", interactions("t.parquet", GOOD_PARQUET[: len(GOOD_PARQUET) // 2]), ("t.parquet", "not a readable Parquet file")),
    Case("csv named parquet", interactions("c.parquet", GOOD), ("c.parquet", "not a readable Parquet file")),
    Case("latin-1 text", interactions("l.csv", "user_id,item_id,ts,title\n1,10,2026-01-01,caf\xe9\n".encode("latin-1")), ("l.csv", "not UTF-8", "line 2")),
    Case("empty file", interactions("e.csv", b""), ("e.csv", "empty file")),
    Case("unsupported extension", interactions("x.json", GOOD), ("x.json", "unsupported format")),
    Case("directory as interactions", directory("folder.csv"), ("folder.csv", "is a directory")),
    Case("missing file", lambda folder: ["--interactions", str(folder / "absent.csv")], ("absent.csv", "not found")),
    Case("ragged row", interactions("r.csv", ROW + "1,10,2026-01-01,1,extra,more\n"), ("r.csv", "more fields than the header")),
    Case("one long row", interactions("o.csv", ROW + "1,10,2026-01-01,1\n2,11,2026-01-01,1,9\n"), ("o.csv", "not valid CSV", "line 3")),
    # -- timestamps
    Case("unparseable timestamp", interactions("t.csv", ROW + "1,10,yesterday,1\n"), ("t.csv", "ts", "cannot parse as a timestamp")),
    Case("timestamp after as-of", interactions("t.csv", ROW + "1,10,2030-01-01,1\n"), ("t.csv", "ts")),
    Case("numeric timestamp without unit", interactions("t.csv", ROW + "1,10,1700000000,1\n"), ("ts", "need a unit")),
    Case("epoch out of range", interactions("t.csv", ROW + "1,10,100000000000000,1\n", "--map", "interactions.ts=ts", "--map", "interactions.ts.unit=s"), ("ts", "since the epoch")),
    # -- related files
    Case("fractional item id in items", with_items("item_id,category\n10,a\n11.5,b\n"), ("items.csv", "item_id", "not a whole number")),
    Case("duplicate item ids", with_items("item_id,category\n10,a\n10,b\n11,c\n"), ("items.csv", "item_id")),
    Case("interaction of an unknown item", with_items("item_id,category\n10,a\n"), ("unknown items.item_id",)),
    Case("users with an unknown region", with_users("user_id,region\n1,mars\n2,na\n"), ("users.csv", "region")),
    Case("users with a bad boolean", with_users("user_id,push_enabled\n1,maybe\n2,yes\n"), ("users.csv", "push_enabled", "not a boolean")),
    Case("users with infinite quiet hours", with_users("user_id,quiet_hours_start\n1,inf\n2,3\n"), ("users.csv", "quiet_hours_start", "int64")),
    Case("items with a fractional stock", with_items("item_id,stock\n10,2.5\n11,1\n"), ("items.csv", "stock", "not a whole number")),
    # -- mappings and flags
    Case("mapping not YAML", with_mapping("interactions: [unclosed"), ("mapping.yaml", "not valid YAML")),
    Case("mapping of an unknown table", with_mapping("orders: {user_id: a}"), ("mapping.yaml", "cannot map table 'orders'")),
    Case("mapping of an unknown column", with_mapping("interactions: {rating: value}"), ("mapping.yaml", "interactions.rating")),
    Case("mapping reads an absent column", with_mapping("interactions: {user_id: userId}"), ("good.csv", "userId")),
    Case("mapping with a bad unit", with_mapping("interactions: {ts: {column: ts, unit: days}}"), ("mapping.yaml", "unit 'days'")),
    Case("mapping file is a directory", lambda folder: ["--interactions", str(_file("good.csv", GOOD)(folder)), "--mapping", str(folder)], ("cannot read mapping file",)),
    Case("flag without =", with_flags("interactions.user_id"), ("--map", "interactions.user_id")),
    Case("flag with an unknown option", with_flags("interactions.user_id.colour=red"), ("--map", "unknown option 'colour'")),
    Case("items mapping without an items file", with_flags("items.category=genre"), ("no items file was given",)),
]  # fmt: skip


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path → SHA-256 of its bytes)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def imported_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A warehouse holding one good import: what every bad import must leave untouched."""
    root = tmp_path_factory.mktemp("corpus") / "warehouse"
    source = root.parent / "good.csv"
    source.write_text(GOOD)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WAREHOUSE_ENV_VAR, root.as_uri())
        assert cli.main(["import", "--interactions", str(source), *AS_OF]) == 0
    return root


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(
    case: Case,
    imported_warehouse: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    warehouse = tmp_path / "warehouse"
    shutil.copytree(imported_warehouse, warehouse)
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, warehouse.as_uri())
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    before = tree_digest(warehouse)
    capsys.readouterr()

    code = cli.main(["import", *case.make(inputs), *AS_OF])

    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("recsys import: error: "), captured.err
    assert "Traceback" not in captured.err
    for fragment in case.expected:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert captured.out == ""
    assert tree_digest(warehouse) == before
