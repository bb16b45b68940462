"""Region backfills launched as docs/AUTOMATION.md writes them (the CLI command and the
GraphQL mutation), under a real `dagster-webserver` and `dagster-daemon`: one run per
partition, and every run succeeds.

The CLI once created runs under another code location name than the daemon's, which then
refused every one of them while the backfills page showed the backfill as a green "Success";
only the runs' own status tells, so that is what these tests read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import yaml

from recsys_assets.config import Settings, load_settings
from recsys_assets.config.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH
from recsys_assets.data.seed import seed_warehouse
from recsys_assets.definitions import build_definitions
from recsys_assets.pipeline.jobs import MODEL_JOB, REFRESH_JOB
from recsys_assets.pipeline.partitions import surface_region_partitions
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import WAREHOUSE_ENV_VAR, Warehouse
from recsys_assets_tests.conftest import TINY_SEED, _free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "AUTOMATION.md"
WORKSPACE = REPO_ROOT / "workspace.yaml"
BIN = Path(sys.executable).parent
LOCATION = "recsys_assets"
STARTUP_TIMEOUT_S = 180
BACKFILL_TIMEOUT_S = 420
POLL_S = 2
RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}
BACKFILL_TAG = "dagster/backfill"
PARTITIONS_TESTED = 2
"""The tests run the first two partitions of the documented eu range, not all five: a whole
region took 75–125 s on this project's 2 shared cores (docs/AUTOMATION.md), and two already
fill both run slots (`max_concurrent_runs: 2`)."""

BACKFILL_QUERY = """
query BackfillRuns($runs: RunsFilter!) {
  runsOrError(filter: $runs) {
    __typename
    ... on Runs {
      results { runId status endTime tags { key value } assetSelection { path } }
    }
    ... on PythonError { message }
  }
}
"""
LOCATION_QUERY = """
query LocationStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""
RELOAD_MUTATION = """
mutation Reload($location: String!) {
  reloadRepositoryLocation(repositoryLocationName: $location) {
    __typename
    ... on WorkspaceLocationEntry {
      loadStatus
      locationOrLoadError { __typename ... on PythonError { message } }
    }
  }
}
"""
PARTITIONS_QUERY = """
query RefreshPartitions($repository: RepositorySelector!, $partitionSet: String!) {
  partitionSetOrError(repositorySelector: $repository, partitionSetName: $partitionSet) {
    __typename
    ... on PartitionSet {
      partitionsOrError { __typename ... on Partitions { results { name } } }
    }
  }
}
"""


def documented_block(language: str, containing: str) -> str:
    """The fenced `language` block of docs/AUTOMATION.md that contains `containing`."""
    blocks = re.findall(rf"```{language}\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"expected one ```{language} block with {containing!r} in {DOCS}"
    return found[0]


def documented_region_backfill_command() -> list[str]:
    """The documented `dagster job backfill … --from … --to …` command, as argv."""
    block = documented_block("bash", "dagster job backfill")
    commands = [
        shlex.split(command, comments=True)
        for command in block.replace("\\\n", " ").splitlines()
        if command.startswith("dagster job backfill")
    ]
    ranged = [argv for argv in commands if "--from" in argv]
    assert len(ranged) == 1, f"expected one documented --from/--to backfill, got {commands}"
    return ranged[0]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@dataclass
class Deployment:
    """A webserver and a daemon over one temporary instance and seeded warehouse."""

    url: str
    env: dict[str, str]
    settings: Settings
    config_path: Path
    logs: list[Path]

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in self.logs
        )

    def wait_for(self, what: str, done: Callable[[], Any], timeout_s: float) -> Any:
        """Poll `done` until it returns something truthy; fail with the servers' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := done():
                return result
            time.sleep(POLL_S)
        pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.log_tail()}")

    def location_loaded(self) -> bool:
        entries = self.graphql(LOCATION_QUERY)["workspaceOrError"]["locationEntries"]
        entry = next(entry for entry in entries if entry["name"] == LOCATION)
        error = entry["locationOrLoadError"]
        assert error is None or error["__typename"] != "PythonError", error["message"]
        return entry["loadStatus"] == "LOADED" and error is not None

    def finished_backfill(self, backfill_id: str, expected_runs: int) -> list[dict[str, Any]]:
        """The backfill's runs, once it has at least `expected_runs` and all have finished.

        Runs, not the backfill's status: a CLI backfill is "completed" once its runs are
        submitted, whatever becomes of them.
        """

        def finished() -> list[dict[str, Any]] | None:
            tag = {"key": BACKFILL_TAG, "value": backfill_id}
            runs = self.graphql(BACKFILL_QUERY, runs={"tags": [tag]})["runsOrError"]["results"]
            done = len(runs) >= expected_runs and all(run["status"] in RUN_DONE for run in runs)
            return runs if done else None

        return self.wait_for(f"the runs of backfill {backfill_id}", finished, BACKFILL_TIMEOUT_S)

    def refresh_partition_keys(self) -> list[str]:
        data = self.graphql(
            PARTITIONS_QUERY,
            repository={"repositoryLocationName": LOCATION, "repositoryName": "__repository__"},
            partitionSet=f"{REFRESH_JOB}_partition_set",
        )
        partitions = data["partitionSetOrError"]["partitionsOrError"]
        return [partition["name"] for partition in partitions["results"]]


def _start(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A server in its own process group, so teardown also ends its code servers and runs."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server gently, then kill whatever of its group is left (code servers, runs)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """`dagster-webserver` and `dagster-daemon` on the project's workspace.yaml and
    dagster.yaml, over a tiny warehouse seeded as of today with a trained model bundle."""
    root = tmp_path_factory.mktemp("backfill_e2e")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    # One training epoch: these tests are about how runs are launched, not about the model.
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["training"]["epochs"] = 1
    config_path = root / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    settings = load_settings(config_path)
    warehouse = Warehouse((root / "warehouse").as_uri())
    # As of today (the default): runs launched by the daemon score at the real clock.
    seed_warehouse(warehouse, scale="tiny", seed=TINY_SEED, settings=settings)
    # Created here, once: the webserver and the daemon would both migrate a new SQLite
    # storage at the same time.
    dg.DagsterInstance.from_config(str(home)).dispose()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        WAREHOUSE_ENV_VAR: warehouse.url,
        CONFIG_ENV_VAR: str(config_path),
    }
    port = _free_port()
    logs = [root / "webserver.log", root / "daemon.log"]
    webserver = [str(BIN / "dagster-webserver"), "-w", str(WORKSPACE), "-h", "127.0.0.1"]
    processes = [
        _start([*webserver, "-p", str(port)], env, logs[0]),
        _start([str(BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)], env, logs[1]),
    ]
    try:
        # The bundle every partition run scores with, trained while the servers start.
        recsys = RecsysResource(warehouse_url=warehouse.url, config_path=str(config_path))
        with dg.DagsterInstance.from_config(str(home)) as instance:
            model = build_definitions(recsys).resolve_job_def(MODEL_JOB)
            assert model.execute_in_process(instance=instance).success
        running = Deployment(f"http://127.0.0.1:{port}", env, settings, config_path, logs)

        def webserver_up() -> bool:
            try:
                return running.location_loaded()
            except httpx.TransportError:
                return False

        running.wait_for("the webserver to load the code location", webserver_up, STARTUP_TIMEOUT_S)
        yield running
    finally:
        for process in processes:
            _stop(process)


def region_keys(settings: Settings, first: str, last: str) -> list[str]:
    """The partition keys from `first` to `last`, in the partitions' own order."""
    keys = surface_region_partitions(settings).get_partition_keys()
    return keys[keys.index(first) : keys.index(last) + 1]


def run_partition(run: dict[str, Any]) -> str:
    """The one partition of a run: a job backfill tags it, an asset backfill tags a range."""
    tags = {tag["key"]: tag["value"] for tag in run["tags"]}
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    start, end = (
        tags["dagster/asset_partition_range_start"],
        tags["dagster/asset_partition_range_end"],
    )
    assert start == end, f"run {run['runId']} covers {start}…{end}, not one partition"
    return start


def partition_chain(deployment: Deployment) -> set[tuple[str, ...]]:
    """The assets of one partition run: the groups `pipeline` and `publish`."""
    definitions = build_definitions(RecsysResource(config_path=str(deployment.config_path)))
    return {
        tuple(spec.key.path)
        for spec in definitions.resolve_all_asset_specs()
        if spec.group_name in {"pipeline", "publish"}
    }


def assert_one_successful_run_per_partition(
    runs: list[dict[str, Any]], keys: list[str], chain: set[tuple[str, ...]]
) -> None:
    """One run per partition, each the partition's whole chain, and every run succeeded."""
    by_partition = {run_partition(run): run["status"] for run in runs}
    assert len(runs) == len(keys), f"{len(runs)} runs for {len(keys)} partitions: {by_partition}"
    assert by_partition == dict.fromkeys(keys, "SUCCESS")
    for run in runs:
        if run["assetSelection"] is not None:  # None: a job run, the job's whole selection
            assert {tuple(asset["path"]) for asset in run["assetSelection"]} == chain


def test_documented_cli_region_backfill_runs_every_partition(deployment: Deployment) -> None:
    argv = documented_region_backfill_command()
    assert option(argv, "-w") == "workspace.yaml", "must use the location the daemon loads"
    region = region_keys(deployment.settings, option(argv, "--from"), option(argv, "--to"))
    assert region == [f"eu|{surface}" for surface in deployment.settings.surfaces]
    keys = region[:PARTITIONS_TESTED]
    argv[argv.index("--to") + 1] = keys[-1]

    started = time.time()
    launched = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=REPO_ROOT,
        env=deployment.env,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    backfill_id = re.search(r"Launched backfill job `(\w+)`", launched.stdout)
    assert backfill_id, launched.stdout

    runs = deployment.finished_backfill(backfill_id.group(1), len(keys))
    assert_one_successful_run_per_partition(runs, keys, partition_chain(deployment))
    log.info(
        "CLI backfill of %d partitions: %.1fs from the command to the last run's end",
        len(keys),
        max(run["endTime"] for run in runs) - started,
    )


def test_documented_graphql_region_backfill_runs_every_partition(deployment: Deployment) -> None:
    mutation = documented_block("graphql", "launchPartitionBackfill")
    variables = json.loads(documented_block("json", "partitionNames"))
    params = variables["params"]
    region = region_keys(deployment.settings, "eu|home_feed", "eu|enterprise_action_queue")
    assert params["partitionNames"] == region
    chain = partition_chain(deployment)
    assert {tuple(asset["path"]) for asset in params["assetSelection"]} == chain
    keys = params["partitionNames"] = region[:PARTITIONS_TESTED]

    started = time.time()
    launched = deployment.graphql(mutation, **variables)["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched

    runs = deployment.finished_backfill(launched["backfillId"], len(keys))
    assert_one_successful_run_per_partition(runs, keys, chain)
    log.info(
        "GraphQL asset backfill of %d partitions: %.1fs from the request to the last run's end",
        len(keys),
        max(run["endTime"] for run in runs) - started,
    )


def test_reloaded_code_location_serves_a_changed_configuration(deployment: Deployment) -> None:
    """Partitions come from the configuration when the code location loads, so a reload
    (a new code-server process) picks up a change; nothing is cached across it."""
    original = deployment.config_path.read_text()
    changed = yaml.safe_load(original)
    changed["regions"] = [*changed["regions"], "mea"]
    assert "mea|home_feed" not in deployment.refresh_partition_keys()
    try:
        deployment.config_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        reloaded = deployment.graphql(RELOAD_MUTATION, location=LOCATION)
        assert reloaded["reloadRepositoryLocation"]["__typename"] == "WorkspaceLocationEntry"
        deployment.wait_for("the reload", deployment.location_loaded, STARTUP_TIMEOUT_S)
        assert "mea|home_feed" in deployment.refresh_partition_keys()
    finally:
        deployment.config_path.write_text(original)


def test_servers_and_runs_log_no_beta_warning(deployment: Deployment) -> None:
    """Code servers and run workers import the definitions over and over; none may warn."""
    for path in deployment.logs:
        text = path.read_text(errors="replace")
        assert "BetaWarning" not in text, f"{path.name}:\n{deployment.log_tail()}"
