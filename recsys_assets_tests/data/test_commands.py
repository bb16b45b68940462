"""`recsys seed` and `recsys import` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_assets import cli
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.data.test_importer import (
    MOVIELENS_FLAGS,
    MOVIELENS_MAPPING,
    MOVIES,
    RATINGS,
)


def test_seed_command_prints_row_counts(
    local_warehouse: Warehouse, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["seed", "--scale", "tiny", "--seed", "3", "--as-of", "2026-11-20"]) == 0
    out = capsys.readouterr().out
    assert "seeded tiny data (seed 3, as of 2026-11-20 00:00 UTC)" in out
    assert "users                   500" in out
    snapshot = read_snapshot(local_warehouse)
    assert (snapshot["seed"], snapshot["as_of"]) == (3, "2026-11-20T00:00:00")


def test_import_command_with_mapping_file_and_flags(
    local_warehouse: Warehouse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ratings.csv").write_text(RATINGS)
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "mapping.yaml").write_text(MOVIELENS_MAPPING)
    code = cli.main(
        [
            "import",
            "--interactions", str(tmp_path / "ratings.csv"),
            "--items", str(tmp_path / "movies.csv"),
            "--mapping", str(tmp_path / "mapping.yaml"),
            "--map", "interactions.event_type.constant=view",
            "--as-of", "2026-11-20T06:00",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "interactions              4  (" in out and "derived from interactions.user_id" in out
    assert set(read_raw(local_warehouse, "interactions")["event_type"]) == {"view"}

    flags = [argument for flag in MOVIELENS_FLAGS for argument in ("--map", flag)]
    ratings_only = ["import", "--interactions", str(tmp_path / "ratings.csv")]
    assert cli.main([*ratings_only, *flags]) == 2
    assert "no items file was given" in capsys.readouterr().err
    interaction_flags = [
        argument
        for flag in MOVIELENS_FLAGS
        if flag.startswith("interactions.")
        for argument in ("--map", flag)
    ]
    assert cli.main([*ratings_only, *interaction_flags]) == 0
    items = read_raw(local_warehouse, "items")
    assert items["item_id"].tolist() == [1, 2, 3]  # derived: only the rated movies
    assert set(items["category"]) == {"unknown"}


def test_import_command_reports_bad_input_with_exit_code_2(
    local_warehouse: Warehouse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ratings.csv").write_text(RATINGS)
    code = cli.main(["import", "--interactions", str(tmp_path / "ratings.csv")])
    assert code == 2
    err = capsys.readouterr().err
    assert "table 'interactions'" in err and "column 'user_id': missing column" in err
    assert not local_warehouse.exists("raw")

    code = cli.main(["import", "--interactions", "x.csv", "--map", "interactions.ts.zone=UTC"])
    assert code == 2
    assert "unknown option 'zone'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["seed", "import"])
def test_help_is_available(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: recsys {command}" in capsys.readouterr().out
