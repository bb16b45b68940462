"""The quality target on real ratings: home_feed lists clearly beat every baseline.

Each test imports one data set (MovieLens 100k as is, or a deterministic variant of it from
`recsys_assets_tests.realdata`) into a temporary warehouse and runs the whole offline
evaluation (pipeline on the past, baselines on the same split) for home_feed at K = 20.
"Clearly" is a margin: the lists must reach MARGIN × the best baseline on Recall and nDCG.
Each run trains the pipeline's models, so these are the suite's slowest tests (minutes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys_assets.evaluation.baselines import BASELINES
from recsys_assets.evaluation.evaluate import (
    LISTS,
    QUALITY_METRICS,
    EvaluationReport,
    SurfaceEvaluation,
    evaluate,
)
from recsys_assets.warehouse import Warehouse
from recsys_assets_tests.realdata import (
    ImportFiles,
    all_raters_config,
    import_into,
    long_history_ratings,
    ml100k,
    sparse_purchases,
)

pytestmark = pytest.mark.realdata

SURFACE = "home_feed"
K = 20
MARGIN = 1.1
SPARSE_MARGIN = 0.95
"""Sparse purchases: the issue's target is MARGIN too, and it is not met yet (0.99× EASE on
Recall and nDCG, docs/EVALUATION.md); this guards what is reached, so a regression towards
the 0.90× of a ranker without its validation-chosen prior fails."""
FULL_LISTS = 0.9
"""Sparse data: personal lists must still be at least this share of store_depth long."""


def evaluate_home_feed(
    files: ImportFiles, folder: Path
) -> tuple[EvaluationReport, SurfaceEvaluation]:
    url = (folder / "warehouse").as_uri()
    import_into(url, files.interactions, files.mapping, items=files.items)
    report = evaluate(
        Warehouse(url), surfaces=[SURFACE], k=K, config_path=str(all_raters_config(folder))
    )
    return report, report.surfaces[0]


def assert_clearly_beats_baselines(
    report: EvaluationReport, home: SurfaceEvaluation, margin: float = MARGIN
) -> None:
    lists = home.metrics[LISTS].as_dict()
    shortfalls = []
    for metric in QUALITY_METRICS:
        best = max(BASELINES, key=lambda name: home.metrics[name].as_dict()[metric])
        target = margin * home.metrics[best].as_dict()[metric]
        if lists[metric] < target:
            shortfalls.append(
                f"{metric}@{K}: lists {lists[metric]:.4f} < {margin} × {best} = {target:.4f}"
            )
    assert not shortfalls, "\n".join(
        [*shortfalls, f"({home.lists_source} lists)", report.text_table()]
    )


def test_ml100k_lists_clearly_beat_every_baseline(tmp_path: Path) -> None:
    report, home = evaluate_home_feed(ml100k(), tmp_path)
    assert_clearly_beats_baselines(report, home)


def test_long_history_lists_clearly_beat_every_baseline(tmp_path: Path) -> None:
    report, home = evaluate_home_feed(long_history_ratings(tmp_path), tmp_path)
    assert_clearly_beats_baselines(report, home)


def test_sparse_purchase_lists_are_published_full_and_near_the_best_baseline(
    tmp_path: Path,
) -> None:
    report, home = evaluate_home_feed(sparse_purchases(tmp_path), tmp_path)
    table = report.text_table()
    assert home.lists_source == "published", f"some region did not publish:\n{home.notes}\n{table}"
    assert home.mean_list_length >= FULL_LISTS * home.store_depth, (
        f"mean list length {home.mean_list_length:.1f} < {FULL_LISTS} × store_depth "
        f"{home.store_depth}\n{table}"
    )
    assert_clearly_beats_baselines(report, home, SPARSE_MARGIN)
    popularity = home.metrics["popularity"].as_dict()
    for metric in QUALITY_METRICS:
        assert home.metrics[LISTS].as_dict()[metric] >= MARGIN * popularity[metric], table
