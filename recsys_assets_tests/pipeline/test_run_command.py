"""`recsys run` when the model bundle's run fails (exit 1 with the step's cause) or the
configuration is bad (exit 2 naming each finding), with no traceback of the CLI's own; and
its pinned clock (`--score-time`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from recsys_assets import cli
from recsys_assets.config.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH
from recsys_assets.models.device import DEVICE_ENV_VAR
from recsys_assets.publish.versions import PUBLISHED_ROOT
from recsys_assets.warehouse import Warehouse


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_failed_training_run_is_exit_1_naming_its_cause(
    tiny_warehouse: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv(DEVICE_ENV_VAR, "cuda")  # asked for, not there: training fails
    code = cli.main(["run", "--surface", "home_feed", "--region", "na"])
    assert code == 1
    error = capsys.readouterr().err
    assert "recsys run: model_bundle failed: model_bundle:" in error
    assert "torch sees no GPU" in error
    assert not tiny_warehouse.exists(PUBLISHED_ROOT)  # nothing was refreshed


def test_a_bad_configuration_is_exit_2_with_each_finding_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["pipeline"]["step_threads"] = 0
    config["pipeline"]["scoring_precision"] = "fp8"
    path = tmp_path / "surfaces.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    monkeypatch.setenv("RECSYS_WAREHOUSE_URL", (tmp_path / "warehouse").as_uri())
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert cli.main(["run", "--surface", "home_feed", "--region", "na"]) == 2
    assert capsys.readouterr().err == (
        f"recsys run: error: invalid configuration in {path}: pipeline.step_threads: Input "
        "should be greater than or equal to 1 or Input should be 'auto' (got 0); "
        "pipeline.scoring_precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp8')\n"
    )
    assert not (tmp_path / "warehouse").exists()


def test_score_time_pins_the_pipeline_clock(
    tiny_warehouse: Warehouse,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    pinned = "2026-11-20T06:00:00"
    partition = ["--surface", "home_feed", "--region", "na", "--workers", "1"]
    assert cli.main(["run", *partition, "--score-time", pinned]) == 0
    scored = pd.concat(
        pd.read_parquet(path, columns=["score_time"])
        for path in (Path(tiny_warehouse.root) / "pipeline" / "scored_candidates").rglob(
            "*.parquet"
        )
    )
    assert len(scored) and set(scored["score_time"]) == {pd.Timestamp(pinned)}
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.main(["run", *partition, "--score-time", "yesterday"])
    assert refused.value.code == 2
    assert "--score-time: expected an ISO 8601 time" in capsys.readouterr().err
