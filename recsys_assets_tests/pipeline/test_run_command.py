"""`recsys run` when the model bundle's run fails: exit 1 with the step's cause, no
traceback of the CLI's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsys_assets import cli
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
