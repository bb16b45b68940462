"""The code location as Dagster's processes load it: one configuration, no Beta notices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.resources import RecsysResource


def test_partitions_come_from_the_configuration_the_resource_reads(tmp_path: Path) -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["regions"] = ["north", "south"]
    config["surfaces"] = {name: config["surfaces"][name] for name in ("home_feed", "push")}
    config_path = tmp_path / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    definitions = build_definitions(RecsysResource(config_path=str(config_path)))

    expected = ["north|home_feed", "north|push", "south|home_feed", "south|push"]
    refresh = definitions.resolve_job_def(REFRESH_JOB)
    assert refresh.partitions_def is not None
    assert refresh.partitions_def.get_partition_keys() == expected
    partitioned = [
        assets_def
        for assets_def in definitions.resolve_asset_graph().assets_defs
        if assets_def.partitions_def is not None
    ]
    # subjects … slates (5), fallback_lists, published_lists, send_plans
    assert {key.to_user_string() for key in (a.key for a in partitioned)} >= {
        "subjects",
        "candidate_pools",
        "features_asof",
        "scored_candidates",
        "slates",
        "fallback_lists",
        "published_lists",
        "send_plans",
    }
    for assets_def in partitioned:
        assert assets_def.partitions_def.get_partition_keys() == expected, assets_def.key
    assert definitions.resolve_implicit_global_asset_job_def().executor_def is (
        dg.in_process_executor
    )


def test_loading_the_definitions_writes_no_beta_warning() -> None:
    """A code server or run worker imports the definitions in a fresh process: no notice.

    The probe warned after the import must still show: the filter is scoped to the import of
    the asset modules, not switched off for the whole process.
    """
    probe = (
        "import warnings, dagster as dg\n"
        "from recsys_assets.definitions import defs\n"
        "defs.resolve_job_def('refresh_lists')\n"
        "warnings.warn('probe', dg.BetaWarning)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-W", "default", "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    warned = [line for line in loaded.stderr.splitlines() if "Warning" in line]
    assert len(warned) == 1 and "BetaWarning: probe" in warned[0], loaded.stderr
