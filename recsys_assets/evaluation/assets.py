"""The `evaluation` asset: the offline evaluation's table in the Dagster UI.

No `from __future__ import annotations` here: Dagster reads the run-config class from the
fields' real annotations.
"""

import dagster as dg
from pydantic import Field

from recsys_assets.evaluation.evaluate import (
    DEFAULT_HOLDOUT,
    DEFAULT_K,
    DEFAULT_SEED,
    DEFAULT_SURFACES,
    evaluate,
)
from recsys_assets.pipeline.resources import RecsysResource

EVALUATION_GROUP = "evaluation"


class EvaluationConfig(dg.Config):
    """What to evaluate; the defaults are those of `recsys evaluate`."""

    surfaces: list[str] = Field(default_factory=lambda: list(DEFAULT_SURFACES))
    k: int = DEFAULT_K
    holdout: float = DEFAULT_HOLDOUT
    seed: int = DEFAULT_SEED


@dg.asset(group_name=EVALUATION_GROUP, kinds={"pandas"})
def evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, recsys: RecsysResource
) -> dg.MaterializeResult:
    """Offline evaluation on a temporal holdout: the lists vs popularity, item-kNN, ALS, EASE.

    Runs its own split and its own pipeline run in a scratch warehouse (the warehouse is only
    read), so it needs no upstream asset. See docs/EVALUATION.md.
    """
    report = evaluate(
        recsys.warehouse(),
        surfaces=config.surfaces,
        k=config.k,
        holdout=config.holdout,
        seed=config.seed,
        config_path=recsys.config_path or None,
        progress=context.log.info,
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "evaluation": dg.MetadataValue.md(report.markdown()),
        "split": dg.MetadataValue.json(report.split),
        "k": report.k,
        "seconds": round(report.seconds, 1),
    }
    for surface in report.surfaces:
        metadata[f"{surface.surface}_lists_source"] = surface.lists_source
        for metric, won in surface.beats_baselines().items():
            metadata[f"{surface.surface}_{metric}_beats_baselines"] = won
        for method, metrics in surface.metrics.items():
            metadata[f"{surface.surface}_{method}_recall"] = round(metrics.recall, 6)
            metadata[f"{surface.surface}_{method}_ndcg"] = round(metrics.ndcg, 6)
        metadata[f"{surface.surface}_source_recall"] = dg.MetadataValue.json(surface.source_recall)
    return dg.MaterializeResult(metadata=metadata)
