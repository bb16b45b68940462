"""A corrupted-warehouse matrix: (truncated/garbage/missing manifest, missing/garbage Parquet
part, missing snapshot) × (rollback, manifest, export, run). Every cell ends in one clear
error line and exit code 2 (no traceback), or in a correct result where the command can still
do its job (a rollback away from a broken active version); nothing is half-written.

Counts are reported in docs/PUBLISH.md ("Corrupted warehouse").
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from recsys_assets import cli
from recsys_assets.config import load_settings
from recsys_assets.publish import publish_version, read_manifest
from recsys_assets.publish.versions import LISTS_FILE, VALIDATION_FILE, manifest_path, utc_now
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse
from recsys_assets_tests.publish.builders import REGION, SURFACE, make_lists
from recsys_assets_tests.reliability.test_import_corpus import tree_digest

PARTITION = ["--surface", SURFACE, "--region", REGION]
MANIFEST = manifest_path(SURFACE, REGION)


@dataclass(frozen=True)
class Published:
    root: Path
    active: str
    previous: str

    def version_file(self, version: str, name: str) -> Path:
        return self.root / f"published/surface={SURFACE}/region={REGION}/versions/{version}/{name}"


Corruption = Callable[[Published], None]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xff garbage \xfe" * 7)


CORRUPTIONS: dict[str, Corruption] = {
    "manifest truncated": lambda p: _truncate(p.root / MANIFEST),
    "manifest garbage": lambda p: _garbage(p.root / MANIFEST),
    "manifest is a JSON list": lambda p: (p.root / MANIFEST).write_text("[1, 2]"),
    "manifest without fields": lambda p: (p.root / MANIFEST).write_text("{}"),
    "manifest missing": lambda p: (p.root / MANIFEST).unlink(),
    "active lists missing": lambda p: p.version_file(p.active, LISTS_FILE).unlink(),
    "active lists garbage": lambda p: _garbage(p.version_file(p.active, LISTS_FILE)),
    "active lists truncated": lambda p: _truncate(p.version_file(p.active, LISTS_FILE)),
    "previous lists missing": lambda p: p.version_file(p.previous, LISTS_FILE).unlink(),
    "previous lists garbage": lambda p: _garbage(p.version_file(p.previous, LISTS_FILE)),
    "previous report garbage": lambda p: _garbage(p.version_file(p.previous, VALIDATION_FILE)),
    "previous folder missing": lambda p: shutil.rmtree(p.version_file(p.previous, "")),
    "snapshot missing": lambda p: (p.root / "raw/_snapshot.json").unlink(),
}
COMMANDS: dict[str, list[str]] = {
    "rollback": ["rollback", *PARTITION],
    "manifest": ["manifest", *PARTITION],
    "export": ["export", *PARTITION, "--out", "OUT"],
    "run": ["run", *PARTITION, "--reuse-model"],
}
READERS = ("rollback", "manifest", "export")
"""The commands run against every corruption; `run` only where it is cheap (below)."""
BROKEN_MANIFEST = ("manifest truncated", "manifest garbage", "manifest is a JSON list")
WORKS = {
    # Rolling back is the way out of a broken active version.
    ("active lists missing", "rollback"),
    ("active lists garbage", "rollback"),
    ("active lists truncated", "rollback"),
    # Nothing these commands read is touched.
    *((corruption, "manifest") for corruption in CORRUPTIONS if "lists" in corruption),
    *(
        (corruption, command)
        for corruption in CORRUPTIONS
        if "previous" in corruption
        for command in ("manifest", "export")
    ),
    *(("snapshot missing", command) for command in READERS),
}
EXPECTED_ERROR = {
    **{
        (name, command): (MANIFEST, "not valid JSON")
        for name in BROKEN_MANIFEST[:2]
        for command in READERS
    },
    **{
        ("manifest is a JSON list", command): (MANIFEST, "expected a JSON object, got list")
        for command in READERS
    },
    **{
        ("manifest without fields", command): (MANIFEST, "active_version must be non-empty")
        for command in READERS
    },
    ("manifest missing", "rollback"): ("nothing is published",),
    ("manifest missing", "manifest"): ("nothing is published", MANIFEST),
    ("manifest missing", "export"): ("nothing is published", MANIFEST),
    ("active lists missing", "export"): (LISTS_FILE, "roll back"),
    ("active lists garbage", "export"): (LISTS_FILE, "unreadable", "roll back"),
    ("active lists truncated", "export"): (LISTS_FILE, "unreadable", "roll back"),
    ("previous lists missing", "rollback"): ("cannot roll back", f"has no {LISTS_FILE}"),
    ("previous lists garbage", "rollback"): ("cannot roll back", f"unreadable {LISTS_FILE}"),
    ("previous report garbage", "rollback"): ("cannot roll back", f"unreadable {VALIDATION_FILE}"),
    ("previous folder missing", "rollback"): ("cannot roll back", "missing or not a validated"),
    ("snapshot missing", "run"): ("no raw data snapshot", "recsys seed"),
}
CELLS = [(corruption, command) for corruption in CORRUPTIONS for command in READERS]
CELLS.append(("snapshot missing", "run"))  # `run` is cheap only when it stops before training


@pytest.fixture(scope="module")
def published_template(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """Raw data (a snapshot marker) and two published versions of one partition."""
    root = tmp_path_factory.mktemp("corrupted") / "warehouse"
    warehouse = Warehouse(root.as_uri())
    warehouse.write_json("raw/_snapshot.json", {"snapshot_id": "snap_test"})
    versions = []
    for _ in range(2):
        lists, items, subjects = make_lists(score_time=utc_now())
        outcome = publish_version(
            warehouse, load_settings(), SURFACE, REGION, lists, items=items, subjects=subjects,
            tracking_secret="test",
        )  # fmt: skip
        assert outcome.published, outcome.failures
        versions.append(outcome.version)
    return Published(root, active=versions[1], previous=versions[0])


def test_every_cell_has_an_expectation() -> None:
    assert set(EXPECTED_ERROR) | WORKS == set(CELLS)
    assert not set(EXPECTED_ERROR) & WORKS


@pytest.mark.parametrize(("corruption", "command"), CELLS, ids=[f"{a}-{b}" for a, b in CELLS])
def test_a_corrupted_warehouse_gives_a_clear_error_and_writes_nothing_half(
    corruption: str,
    command: str,
    published_template: Published,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "warehouse"
    shutil.copytree(published_template.root, root)
    published = Published(root, published_template.active, published_template.previous)
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, root.as_uri())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    CORRUPTIONS[corruption](published)
    before = tree_digest(root)
    out = tmp_path / "export" / "lists.parquet"
    argv = [str(out) if argument == "OUT" else argument for argument in COMMANDS[command]]
    capsys.readouterr()

    code = cli.main(argv)

    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if (corruption, command) in WORKS:
        assert code == 0, captured.err
        if command == "rollback":  # only the manifest changed, to the intact version
            manifest = read_manifest(Warehouse(root.as_uri()), SURFACE, REGION)
            assert manifest is not None and manifest.active_version == published.previous
            after = tree_digest(root)
            assert {path for path in after if after[path] != before.get(path)} == {MANIFEST}
        return
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"recsys {command}: error: ")
    for fragment in EXPECTED_ERROR[(corruption, command)]:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert tree_digest(root) == before
    assert not out.exists() and not out.parent.exists()
