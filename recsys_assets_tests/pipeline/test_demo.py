"""`recsys demo` as a new user runs it: a subprocess in an empty folder, partitions in parallel,
a short terminal, every run recorded on the instance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from recsys_assets.config import load_settings

MAX_TERMINAL_LINES = 100


def test_demo_runs_partitions_in_parallel_and_keeps_the_terminal_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "dagster_home"
    env = {
        **os.environ,
        "RECSYS_WAREHOUSE_URL": (tmp_path / "warehouse").as_uri(),
        "DAGSTER_HOME": str(home),
    }
    result = subprocess.run(
        [sys.executable, "-m", "recsys_assets.cli", "demo", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    terminal = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(terminal[-40:])
    assert len(terminal) < MAX_TERMINAL_LINES, "\n".join(terminal)

    settings = load_settings()
    partitions = len(settings.enabled_partitions())
    assert f"{partitions} partition(s), 2 at a time" in result.stdout
    progress = [line for line in terminal if re.match(rf"\[\d+/{partitions}\] ", line)]
    assert len(progress) == partitions
    assert all(", published v" in line for line in progress), "\n".join(progress)
    assert f"done: {partitions}/{partitions} partitions succeeded" in result.stdout.splitlines()[-1]

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == partitions + 1  # the model bundle, then one run per partition
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        partition_keys = {run.tags.get("dagster/partition") for run in runs} - {None}
        assert len(partition_keys) == partitions
