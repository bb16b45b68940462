"""A partition's candidate sources are built once per run, by the candidate_pools fan-out
step, and stored for shard steps in other processes: real runs of candidate_pools on a real
instance over tiny seeded data, in process and with Dagster's multiprocess executor."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from recsys_assets.config.settings import DEFAULT_CONFIG_PATH
from recsys_assets.data import read_raw
from recsys_assets.definitions import build_definitions
from recsys_assets.models.bundle import load_bundle
from recsys_assets.pipeline import candidates as candidate_stage
from recsys_assets.pipeline.assets import SHARD_FAULT_ENV_VAR
from recsys_assets.pipeline.candidate_sources import (
    PER_SHARD_TABLES,
    CandidateSourcesError,
    open_sources,
    sources_folder,
    write_sources,
)
from recsys_assets.pipeline.jobs import MODEL_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.pipeline.shards import (
    part_name,
    shard_part_path,
    stage_path,
    verify_shard_parts,
)
from recsys_assets.rules.person import read_events
from recsys_assets.rules.tombstones import load_tombstones
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

PARTITION = SurfaceRegion("home_feed", "na")
SHARDS = 2
JOB = "candidate_pools_only"
FAN_OUT_STEP = "candidate_pools.candidate_pools_shards"
BUILT = "built the candidate sources"
READ = "candidate sources from"


def candidate_pools_job() -> dg.JobDefinition:
    """candidate_pools alone on Dagster's default executor (in process or multiprocess, by
    run config); step processes rebuild it from this module."""
    definitions = build_definitions()
    return dg.Definitions(
        assets=definitions.assets,
        resources=definitions.resources,
        jobs=[
            dg.define_asset_job(
                JOB, selection=["candidate_pools"], executor_def=dg.multi_or_in_process_executor
            )
        ],
    ).resolve_job_def(JOB)


def _run_config(root: Path, executor: str) -> dict[str, object]:
    execution = {"max_concurrent": 2} if executor == "multiprocess" else {}
    return {
        "execution": {"config": {executor: execution}},
        "resources": {
            "recsys": {
                "config": {
                    "warehouse_url": root.as_uri(),
                    "config_path": str(root / "surfaces.yaml"),
                    "score_time": TINY_AS_OF.isoformat(),
                }
            }
        },
    }


@pytest.fixture(scope="module")
def sharded_root(tiny_raw_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny raw tables, a trained bundle and the partition's subjects in SHARDS shards:
    each run below starts from a copy."""
    root = tmp_path_factory.mktemp("sources_base")
    shutil.copytree(tiny_raw_root, root / "raw")
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["pipeline"]["shards"] = SHARDS
    (root / "surfaces.yaml").write_text(yaml.safe_dump(config))
    definitions = build_definitions(
        RecsysResource(
            warehouse_url=root.as_uri(),
            config_path=str(root / "surfaces.yaml"),
            score_time=TINY_AS_OF.isoformat(),
        )
    )
    subjects_job = dg.Definitions(
        assets=definitions.assets,
        resources=definitions.resources,
        jobs=[dg.define_asset_job("subjects_only", selection=["subjects"])],
    ).resolve_job_def("subjects_only")
    with dg.instance_for_test() as instance:
        assert definitions.resolve_job_def(MODEL_JOB).execute_in_process(instance=instance).success
        assert subjects_job.execute_in_process(
            instance=instance, partition_key=PARTITION.to_key()
        ).success
    return root


@pytest.fixture(scope="module")
def instance() -> Iterator[dg.DagsterInstance]:
    """One persistent instance for the module: a re-execution reads its parent run's step
    outputs from it."""
    with dg.instance_for_test() as instance:
        yield instance


@dataclass
class PoolsRun:
    run_id: str
    root: Path
    logs: list[dg.EventLogEntry]
    metadata: dict[str, object]
    """The candidate_pools materialization's metadata values."""

    def messages(self, text: str) -> list[str | None]:
        """Step keys of the run's log messages that contain `text`."""
        return [entry.step_key for entry in self.logs if text in entry.user_message]

    def parts(self) -> dict[str, bytes]:
        folder = self.root / stage_path("candidate_pools", PARTITION.path)
        return {path.name: path.read_bytes() for path in sorted(folder.glob("*.parquet"))}


def _run(
    instance: dg.DagsterInstance,
    root: Path,
    executor: str,
    reexecute: dg.ReexecutionOptions | None = None,
) -> tuple[dg.JobExecutionResult, PoolsRun]:
    result = dg.execute_job(
        dg.reconstructable(candidate_pools_job),
        instance=instance,
        run_config=_run_config(root, executor),
        tags={"dagster/partition": PARTITION.to_key()},
        reexecution_options=reexecute,
    )
    logs = list(instance.all_logs(result.run_id))
    materialized = [entry.asset_materialization for entry in logs if entry.asset_materialization]
    return result, PoolsRun(
        run_id=result.run_id,
        root=root,
        logs=logs,
        metadata={key: value.value for m in materialized for key, value in m.metadata.items()},
    )


def _copy(sharded_root: Path, folder: Path, *, step_threads: int | None = None) -> Path:
    """A copy of the sharded warehouse; `step_threads` sets pipeline.step_threads in it."""
    shutil.copytree(sharded_root, folder)
    if step_threads is not None:
        config = yaml.safe_load((folder / "surfaces.yaml").read_text())
        config["pipeline"]["step_threads"] = step_threads
        (folder / "surfaces.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def in_process(
    sharded_root: Path, instance: dg.DagsterInstance, tmp_path_factory: pytest.TempPathFactory
) -> PoolsRun:
    root = _copy(sharded_root, tmp_path_factory.mktemp("in_process") / "warehouse", step_threads=1)
    result, run = _run(instance, root, "in_process")
    assert result.success
    return run


@pytest.fixture(scope="module")
def multiprocess(
    sharded_root: Path, instance: dg.DagsterInstance, tmp_path_factory: pytest.TempPathFactory
) -> PoolsRun:
    """Every step in its own process, each spreading its subjects over three threads (the
    in-process run uses one); shard 1 dies once right after writing its part
    (SHARD_FAULT_ENV_VAR), so its retry, a fresh process of the same run, reads the
    sources again."""
    folder = tmp_path_factory.mktemp("multiprocess")
    root = _copy(sharded_root, folder / "warehouse", step_threads=3)
    marker = folder / "fault"
    marker.write_text("candidate_pools/1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SHARD_FAULT_ENV_VAR, str(marker))
        result, run = _run(instance, root, "multiprocess")
    assert result.success
    assert not marker.exists()  # the drill fired
    return run


def test_the_fan_out_builds_the_sources_once_and_shard_steps_in_other_processes_read_them(
    multiprocess: PoolsRun, in_process: PoolsRun
) -> None:
    assert multiprocess.messages(BUILT) == [FAN_OUT_STEP]
    readers = multiprocess.messages(READ)
    shard_steps = [f"candidate_pools.candidate_pools_shard[shard_{i:05d}]" for i in range(2)]
    assert sorted(readers) == sorted([*shard_steps, shard_steps[1]])  # shard 1 twice: retried
    assert multiprocess.metadata["candidate_sources_read_by_shard_steps"] == SHARDS
    assert multiprocess.metadata["candidate_sources_bytes"] > 0
    # In one process the shard steps take the fan-out's sources from memory.
    assert in_process.messages(BUILT) == [FAN_OUT_STEP]
    assert in_process.messages(READ) == []
    assert in_process.metadata["candidate_sources_read_by_shard_steps"] == 0


def test_pools_are_bit_identical_in_process_and_with_the_multiprocess_executor(
    multiprocess: PoolsRun, in_process: PoolsRun
) -> None:
    parts = in_process.parts()
    assert list(parts) == [part_name(index) for index in range(SHARDS)]
    assert parts == multiprocess.parts()
    pools = pd.read_parquet(in_process.root / stage_path("candidate_pools", PARTITION.path))
    assert len(pools) > 1_000
    assert pools["subject_id"].nunique() > 100


def test_the_sources_folder_is_gone_after_the_merge(
    multiprocess: PoolsRun, in_process: PoolsRun
) -> None:
    for run in (multiprocess, in_process):
        assert not (run.root / sources_folder(PARTITION.path)).exists()
        assert (run.root / stage_path("candidate_pools", PARTITION.path)).is_dir()


def _context(warehouse: Warehouse) -> candidate_stage.CandidateContext:
    """The partition's candidate sources, built as the fan-out step builds them."""
    settings = RecsysResource(
        warehouse_url=warehouse.url, config_path=warehouse.path("surfaces.yaml")
    ).settings()
    return candidate_stage.build_context(
        items=read_raw(warehouse, "items"),
        interactions=read_raw(warehouse, "interactions"),
        user_controls=read_raw(warehouse, "user_controls"),
        editorial=read_raw(warehouse, "editorial"),
        region=PARTITION.region,
        surface=settings.surface(PARTITION.surface),
        score_time=pd.Timestamp(TINY_AS_OF),
        trending_window_days=settings.pipeline.trending_window_days,
        trending_min_share=settings.pipeline.trending_min_share,
        recent_history_items=settings.pipeline.recent_history_items,
        collaborative=load_bundle(warehouse).collaborative,
        tombstones=load_tombstones(warehouse),
        events=read_events(warehouse),
    )


def _shard_subjects(warehouse: Warehouse) -> list[np.ndarray]:
    return [
        warehouse.read_parquet(shard_part_path("subjects", PARTITION.path, index))[
            "subject_id"
        ].to_numpy()
        for index in range(SHARDS)
    ]


def _store(warehouse: Warehouse, run_id: str) -> candidate_stage.CandidateContext:
    context = _context(warehouse)
    write_sources(
        warehouse,
        sources_folder(PARTITION.path),
        context,
        _shard_subjects(warehouse),
        run_id=run_id,
        score_time=pd.Timestamp(TINY_AS_OF),
        model_version=load_bundle(warehouse).info.model_version,
        build_seconds=0.0,
    )
    return context


def test_a_shards_stored_sources_hold_its_subjects_rows_and_nothing_else(
    in_process: PoolsRun, tmp_path: Path
) -> None:
    """Stored in the folder of real candidate pools: the part listing and the merge's
    verification see the pools' parts only."""
    warehouse = Warehouse(_copy(in_process.root, tmp_path / "warehouse").as_uri())
    context = _store(warehouse, "run-a")
    bundle = load_bundle(warehouse)
    sources = open_sources(
        warehouse,
        sources_folder(PARTITION.path),
        run_lineage=["run-a"],
        model_version=bundle.info.model_version,
        shards=SHARDS,
        collaborative=bundle.collaborative,
    )
    subjects = _shard_subjects(warehouse)
    for index, shard_subjects in enumerate(subjects):
        shard = sources.for_shard(index)
        for table, column in PER_SHARD_TABLES.items():
            full = getattr(context, table)
            expected = full[full[column].isin(shard_subjects)].reset_index(drop=True)
            stored = getattr(shard, table)
            assert len(stored) > 0, table
            assert set(stored[column]) <= set(shard_subjects), table
            pd.testing.assert_frame_equal(stored, expected, check_exact=True)
        pd.testing.assert_frame_equal(shard.items, context.items, check_exact=True)
        pd.testing.assert_frame_equal(shard.new_items, context.new_items, check_exact=True)
        np.testing.assert_array_equal(shard.similarity.item_ids, context.similarity.item_ids)
        assert (shard.similarity.matrix != context.similarity.matrix).nnz == 0
        for name in ("trending", "editorial", "long_tail"):
            np.testing.assert_array_equal(getattr(shard, name), getattr(context, name))
        assert shard.tenant_items == context.tenant_items
    pools = stage_path("candidate_pools", PARTITION.path)
    assert warehouse.parquet_parts(pools) == [
        shard_part_path("candidate_pools", PARTITION.path, index) for index in range(SHARDS)
    ]
    rows = [
        len(warehouse.read_parquet(shard_part_path("candidate_pools", PARTITION.path, index)))
        for index in range(SHARDS)
    ]
    assert verify_shard_parts(warehouse, pools, subjects, rows) == []


def test_sources_written_by_another_run_are_refused(tmp_path: Path, sharded_root: Path) -> None:
    warehouse = Warehouse(_copy(sharded_root, tmp_path / "warehouse").as_uri())
    _store(warehouse, "run-a")
    bundle = load_bundle(warehouse)
    arguments = {
        "run_lineage": ["run-a"],
        "model_version": bundle.info.model_version,
        "shards": SHARDS,
        "collaborative": bundle.collaborative,
    }
    folder = sources_folder(PARTITION.path)
    with pytest.raises(CandidateSourcesError, match="written by run run-a, not by this run run-b"):
        open_sources(warehouse, folder, **{**arguments, "run_lineage": ["run-b"]})
    # A re-execution of run-a (run-c, whose parent is run-a) may use them.
    assert open_sources(warehouse, folder, **{**arguments, "run_lineage": ["run-c", "run-a"]})
    with pytest.raises(CandidateSourcesError, match="shard count 2, this step has 3"):
        open_sources(warehouse, folder, **{**arguments, "shards": 3})
    with pytest.raises(CandidateSourcesError, match="model bundle"):
        open_sources(warehouse, folder, **{**arguments, "model_version": "other"})
    warehouse.delete(folder, recursive=True)
    with pytest.raises(CandidateSourcesError, match="no candidate sources at"):
        open_sources(warehouse, folder, **arguments)


def test_a_reexecuted_shard_step_takes_its_parent_runs_sources_and_refuses_another_runs(
    multiprocess: PoolsRun, instance: dg.DagsterInstance
) -> None:
    """Re-execution from failure reruns shard steps, not the fan-out that succeeded: their
    new run reads the sources of the run it re-executes, and refuses those of any other."""
    warehouse = Warehouse(multiprocess.root.as_uri())
    step = "candidate_pools.candidate_pools_shard[shard_00000]"
    before = multiprocess.parts()
    reexecute = dg.ReexecutionOptions(parent_run_id=multiprocess.run_id, step_selection=[step])

    _store(warehouse, multiprocess.run_id)
    result, run = _run(instance, multiprocess.root, "in_process", reexecute)
    assert result.success
    assert run.messages(READ) == [step]
    assert multiprocess.parts() == before

    _store(warehouse, "another-run")
    result, run = _run(instance, multiprocess.root, "in_process", reexecute)
    assert not result.success
    failures = [
        entry.dagster_event.step_failure_data.error.message
        for entry in run.logs
        if entry.dagster_event is not None and entry.dagster_event.is_step_failure
    ]
    assert len(failures) == 1  # refused at once, not retried
    assert "were written by run another-run, not by this run" in failures[0]
    assert "materialize candidate_pools for this partition again" in failures[0]
