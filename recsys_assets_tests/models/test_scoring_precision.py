"""Scoring precision: the bundle measures how bf16 inference deviates from fp32 on its
validation rows, `pipeline.scoring_precision` picks fp32 or bf16 within what the bundle
allows, and the CPU path stays fp32 and bit-identical to the block-by-block loop. Real
torch models, a real model_bundle and refresh run on tiny seeded data."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from recsys_assets.config import ConfigError
from recsys_assets.config.settings import DEFAULT_CONFIG_PATH, settings_from_mapping
from recsys_assets.definitions import build_definitions
from recsys_assets.models.bundle import (
    BF16_MAX_ABS_DIFF_TOLERANCE,
    BF16_TOPK_OVERLAP_TOLERANCE,
    BUNDLE_FILE,
    InferencePrecision,
    ModelBundle,
    ScoringPrecisionError,
    current_model_version,
    load_bundle,
    measure_bf16,
    scoring_precision,
)
from recsys_assets.models.calibration import Calibrator
from recsys_assets.models.ranker import RankerModel, ValidationScores, _Network
from recsys_assets.pipeline.assets import SCORING_BLOCK_ROWS, score_in_blocks
from recsys_assets.pipeline.features import FEATURE_COLUMNS
from recsys_assets.pipeline.jobs import REFRESH_JOB
from recsys_assets.pipeline.partitions import SurfaceRegion
from recsys_assets.pipeline.resources import RecsysResource
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.conftest import TINY_AS_OF

CPU = torch.device("cpu")
PARTITION = SurfaceRegion("home_feed", "na")
SCORED = f"pipeline/scored_candidates/{PARTITION.path}"
SCORING_ASSETS = ("subjects", "candidate_pools", "features_asof", "scored_candidates")


@pytest.fixture(scope="module")
def bundle(tiny_trained_root: Path) -> ModelBundle:
    return load_bundle(Warehouse(tiny_trained_root.as_uri()), device=CPU)


def _refresh(
    root: Path, folder: Path, precision: str, assets: tuple[str, ...] = SCORING_ASSETS
) -> dg.ExecuteInProcessResult:
    """The partition's refresh run of `assets` (2 shards) with `pipeline.scoring_precision`,
    on a copy of `root` in `folder`/warehouse."""
    shutil.copytree(root, folder / "warehouse")
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config["pipeline"].update(shards=2, scoring_precision=precision)
    config_path = folder / "surfaces.yaml"
    config_path.write_text(yaml.safe_dump(config))
    definitions = build_definitions(
        RecsysResource(
            warehouse_url=(folder / "warehouse").as_uri(),
            config_path=str(config_path),
            score_time=TINY_AS_OF.isoformat(),
        )
    )
    with dg.instance_for_test() as instance:
        return definitions.resolve_job_def(REFRESH_JOB).execute_in_process(
            instance=instance,
            partition_key=PARTITION.to_key(),
            raise_on_error=False,
            asset_selection=[dg.AssetKey(asset) for asset in assets],
        )


@pytest.fixture(scope="module")
def fp32_run(
    tiny_trained_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dg.ExecuteInProcessResult, Path]:
    """subjects → scored_candidates with the default `auto` on the CPU; the warehouse root."""
    folder = tmp_path_factory.mktemp("fp32_run")
    return _refresh(tiny_trained_root, folder, "auto"), folder / "warehouse"


def _scoring_metadata(result: dg.ExecuteInProcessResult) -> list[tuple[str, str]]:
    """(scoring_device, scoring_precision) of each scoring shard step, then the merge's."""
    shard_outputs = [
        event.event_specific_data.metadata  # type: ignore[union-attr]
        for event in result.all_events
        if event.is_successful_output and "scored_candidates_shard[" in (event.step_key or "")
    ]
    merged = result.asset_materializations_for_node("scored_candidates")[0].metadata
    return [
        (metadata["scoring_device"].value, metadata["scoring_precision"].value)  # type: ignore[misc]
        for metadata in [*shard_outputs, merged]
    ]


def _scored(root: Path) -> pd.DataFrame:
    return (
        Warehouse(root.as_uri())
        .read_parquet(SCORED, columns=["subject_id", "item_id", "calibrated"])
        .sort_values(["subject_id", "item_id"], ignore_index=True)
    )


def test_the_bundle_records_its_bf16_deviation_against_the_tolerance(
    tiny_trained_root: Path, bundle: ModelBundle
) -> None:
    warehouse = Warehouse(tiny_trained_root.as_uri())
    stored = warehouse.read_json(f"models/{current_model_version(warehouse)}/{BUNDLE_FILE}")
    inference = stored["inference"]
    assert inference["tolerance"] == {
        "max_abs_diff": BF16_MAX_ABS_DIFF_TOLERANCE,
        "topk_overlap": BF16_TOPK_OVERLAP_TOLERANCE,
    }
    assert inference["measured_on"] == "cpu"
    assert inference["k"] == 20  # the training surface's display_count
    assert inference["validation_rows"] == stored["metrics"]["ranker_validation_rows"]
    assert 0 < inference["bf16_p99_abs_diff"] <= inference["bf16_max_abs_diff"]
    assert 0 <= inference["bf16_topk_same_order"] <= inference["bf16_topk_overlap"] <= 1
    # The tiny bundle is within tolerance, and says so.
    assert inference["bf16_max_abs_diff"] <= BF16_MAX_ABS_DIFF_TOLERANCE
    assert inference["bf16_topk_overlap"] >= BF16_TOPK_OVERLAP_TOLERANCE
    assert inference["bf16_allowed"] is True
    assert bundle.info.inference == InferencePrecision.from_dict(inference)


def _cancelling_ranker() -> RankerModel:
    """A ranker whose logit is the difference of two hidden units near 1000, where bf16
    keeps only steps of 4-8: its bf16 scores move by whole logits."""
    network = _Network(len(FEATURE_COLUMNS), (2,))
    with torch.no_grad():
        first, _, last = network.mlp
        first.weight.zero_()
        first.weight[0, 0] = 1.0
        first.bias.fill_(1000.0)
        last.weight.copy_(torch.tensor([[1.0, -1.0]]))
        last.bias.zero_()
    return RankerModel(network, hidden_sizes=(2,), device=CPU)


def test_a_ranker_that_bf16_moves_is_not_allowed_and_bf16_is_refused(
    bundle: ModelBundle,
) -> None:
    rng = np.random.default_rng(4)
    features = rng.gamma(1.0, 3.0, (2_000, len(FEATURE_COLUMNS))).astype(np.float32)
    validation = ValidationScores(
        labels=np.zeros(len(features), dtype=np.float32),
        predictions=np.zeros(len(features), dtype=np.float32),
        score_time=np.zeros(len(features)),
        features=features,
        subjects=np.repeat(np.arange(100, dtype=np.int64), 20),
    )
    ranker = _cancelling_ranker()
    identity = Calibrator()
    inference = measure_bf16(ranker, identity, validation, k=5)
    assert not inference.bf16_allowed
    assert inference.bf16_max_abs_diff is not None
    assert inference.bf16_max_abs_diff > BF16_MAX_ABS_DIFF_TOLERANCE

    fragile = dataclasses.replace(
        bundle,
        ranker=ranker,
        calibrator=identity,
        info=dataclasses.replace(bundle.info, model_version="mb_cancelling", inference=inference),
    )
    with pytest.raises(
        ScoringPrecisionError,
        match=r"pipeline\.scoring_precision is 'bf16' but model bundle mb_cancelling does "
        r"not allow bf16: on 2,000 validation rows bf16 moved calibrated probabilities by "
        rf"up to {inference.bf16_max_abs_diff:.4g}.*set pipeline\.scoring_precision to auto",
    ):
        scoring_precision("bf16", fragile)
    assert scoring_precision("auto", fragile) == scoring_precision("fp32", fragile) == "fp32"


def _gamma_rows(rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(1.0, 1.0, (rows, len(FEATURE_COLUMNS))).astype(np.float32)


def test_auto_on_the_cpu_is_fp32_and_bit_identical_to_the_block_loop(
    bundle: ModelBundle,
) -> None:
    assert bundle.info.inference.bf16_allowed  # auto would pick bf16 on CUDA
    assert scoring_precision("auto", bundle) == "fp32"
    matrix = _gamma_rows(2 * SCORING_BLOCK_ROWS + 123, seed=1)
    prediction, calibrated = score_in_blocks(
        bundle, matrix, precision=scoring_precision("auto", bundle)
    )
    # Before this change: one network call per zero-padded block, calibrated per block.
    expected = []
    with torch.inference_mode():
        for start in range(0, len(matrix), SCORING_BLOCK_ROWS):
            block = np.zeros((SCORING_BLOCK_ROWS, matrix.shape[1]), dtype=np.float32)
            rows = len(matrix[start : start + SCORING_BLOCK_ROWS])
            block[:rows] = matrix[start : start + SCORING_BLOCK_ROWS]
            raw = torch.sigmoid(bundle.ranker.network(torch.from_numpy(block))).numpy()
            expected.append(raw[:rows])
    reference = np.concatenate(expected)
    np.testing.assert_array_equal(prediction, reference)
    np.testing.assert_array_equal(calibrated, bundle.calibrator.transform(reference))
    assert calibrated.dtype == np.float64
    # Columns in another order are put back in the ranker's order block by block.
    reordered = bundle.ranker.predict_matrix(
        np.ascontiguousarray(matrix[:, ::-1]),
        columns=tuple(reversed(FEATURE_COLUMNS)),
        batch_size=SCORING_BLOCK_ROWS,
        pad_last=True,
    )
    np.testing.assert_array_equal(reordered, reference)


def test_explicit_bf16_on_the_cpu_scores_within_the_recorded_tolerance(
    fp32_run: tuple[dg.ExecuteInProcessResult, Path], tmp_path: Path
) -> None:
    """Real runs: the default (`auto` → fp32) and, over the same candidates and features,
    scored_candidates again with `bf16`: each calibrated probability within the bundle's
    tolerance, and the metadata says what scored them."""
    fp32_result, fp32_root = fp32_run
    assert fp32_result.success
    assert _scoring_metadata(fp32_result) == [("cpu", "fp32")] * 3
    bf16_result = _refresh(fp32_root, tmp_path, "bf16", assets=("scored_candidates",))
    assert bf16_result.success
    assert _scoring_metadata(bf16_result) == [("cpu", "bf16")] * 3

    fp32, bf16 = _scored(fp32_root), _scored(tmp_path / "warehouse")
    assert len(fp32) > 1_000
    pd.testing.assert_frame_equal(fp32[["subject_id", "item_id"]], bf16[["subject_id", "item_id"]])
    difference = (fp32["calibrated"] - bf16["calibrated"]).abs()
    assert 0 < difference.max() <= BF16_MAX_ABS_DIFF_TOLERANCE


def test_an_old_bundle_json_without_the_field_loads_and_does_not_allow_bf16(
    fp32_run: tuple[dg.ExecuteInProcessResult, Path], tmp_path: Path
) -> None:
    shutil.copytree(fp32_run[1], tmp_path / "old")
    warehouse = Warehouse((tmp_path / "old").as_uri())
    path = f"models/{current_model_version(warehouse)}/{BUNDLE_FILE}"
    stored = warehouse.read_json(path)
    del stored["inference"]
    warehouse.write_json(path, stored)

    old = load_bundle(warehouse, device=CPU)
    assert old.info.inference == InferencePrecision()
    assert not old.info.inference.bf16_allowed
    assert scoring_precision("auto", old) == "fp32"
    message = r"pipeline\.scoring_precision is 'bf16' .* it records no bf16 measurement"
    with pytest.raises(ScoringPrecisionError, match=message):
        scoring_precision("bf16", old)

    # In a run, each scoring shard step fails once with that message: no retries.
    result = _refresh(tmp_path / "old", tmp_path / "run", "bf16", assets=("scored_candidates",))
    assert not result.success
    failures = [
        event
        for event in result.all_events
        if event.step_key and "scored_candidates_shard[" in event.step_key and event.is_failure
    ]
    assert len(failures) == 2
    for failure in failures:
        assert re.search(message, failure.step_failure_data.error.message)  # type: ignore[union-attr]
    assert not [event for event in result.all_events if event.is_step_up_for_retry]


def test_the_setting_is_validated_and_errors_name_the_key() -> None:
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert settings_from_mapping(config).pipeline.scoring_precision == "auto"
    for value in ("fp32", "bf16"):
        config["pipeline"]["scoring_precision"] = value
        assert settings_from_mapping(config).pipeline.scoring_precision == value
    for bad in ("fp16", "BF16", True, 16):
        config["pipeline"]["scoring_precision"] = bad
        with pytest.raises(ConfigError, match=r"pipeline\.scoring_precision: Input should be"):
            settings_from_mapping(config, "test.yaml")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_pinned_cuda_path_matches_the_cpu(bundle: ModelBundle, tiny_trained_root: Path) -> None:
    """Uneven row counts, the last block padded, columns in another order: the pinned,
    double-buffered CUDA loop gives the CPU's fp32 scores (to float rounding)."""
    on_gpu = load_bundle(Warehouse(tiny_trained_root.as_uri()), device=torch.device("cuda"))
    matrix = _gamma_rows(5 * SCORING_BLOCK_ROWS + 7, seed=2)
    reversed_columns = tuple(reversed(FEATURE_COLUMNS))
    shuffled = np.ascontiguousarray(matrix[:, ::-1])
    for pad_last in (True, False):
        cpu = bundle.ranker.predict_matrix(matrix, batch_size=SCORING_BLOCK_ROWS, pad_last=pad_last)
        gpu = on_gpu.ranker.predict_matrix(
            shuffled, columns=reversed_columns, batch_size=SCORING_BLOCK_ROWS, pad_last=pad_last
        )
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-6)
    assert scoring_precision("auto", on_gpu) == "bf16"
    _, fp32 = score_in_blocks(on_gpu, matrix)
    _, bf16 = score_in_blocks(on_gpu, matrix, precision="bf16")
    # bf16 really ran (scores moved), within the range bf16 rounding explains.
    assert 0 < np.abs(fp32 - bf16).max() < 0.1
