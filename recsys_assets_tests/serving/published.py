"""Writing published versions in the documented format (docs/DATA_MODEL.md), for tests.

Serving must read what the contract says, not what one publisher happens to write, so
most serving tests publish with this small writer; the end-to-end test also goes through
`recsys_assets.publish.publish_version`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import pandas as pd

from recsys_assets.warehouse import Warehouse, partition_path


def version_id(at: datetime) -> str:
    return "v" + at.strftime("%Y%m%dT%H%M%S%f")


def write_version(
    warehouse: Warehouse,
    surface: str,
    region: str,
    lists: dict[int | str, Sequence[int]],
    *,
    generated_at: datetime,
    ttl: timedelta,
    version: str | None = None,
    fallback: bool = False,
    model_version: str = "model_a",
    score_offset: float = 0.0,
    activate: bool = True,
    with_calibrated: bool = True,
) -> str:
    """Write one version (subject_id or fallback context_key -> item ids) and flip to it.

    Item at position p: utility (`score`) score_offset + 1/p, calibrated probability 0.8/p
    (null on fallback lists); `with_calibrated=False` writes a version as published before
    lists stored the probability."""
    version = version or version_id(generated_at)
    rows = []
    for key, item_ids in lists.items():
        subject_id = -1 if fallback else int(key)
        context_key = str(key) if fallback else "default"
        list_id = (
            f"fallback_{surface}_{context_key}_{version}"
            if fallback
            else f"precomp_{surface}_{subject_id}_{version}"
        )
        for position, item_id in enumerate(item_ids, start=1):
            rows.append(
                {
                    "list_id": list_id,
                    "subject_id": subject_id,
                    "surface": surface,
                    "region": region,
                    "context_key": context_key,
                    "version": version,
                    "generated_at": generated_at,
                    "expires_at": generated_at + ttl,
                    "model_version": model_version,
                    "feature_set_version": "features_v1",
                    "candidate_policy_version": "candidates_v1",
                    "slate_policy_version": "slate_v1",
                    "pipeline_run_id": "run-test",
                    "source_data_snapshot": "snap-test",
                    "position": position,
                    "item_id": int(item_id),
                    "item_type": "product",
                    "score": score_offset + 1.0 / position,
                    **(
                        {"calibrated": None if fallback else 0.8 / position}
                        if with_calibrated
                        else {}
                    ),
                    "reason_codes": "popular" if fallback else "two_tower|high_confidence",
                    "source_provenance": context_key if fallback else "two_tower|trending",
                    "exploration": False,
                    "propensity": 1.0,
                }
            )
    frame = pd.DataFrame(rows).sort_values(["subject_id", "context_key", "position"])
    root = ("published/fallback/" if fallback else "published/") + partition_path(
        surface=surface, region=region
    )
    folder = f"{root}/versions/{version}"
    warehouse.write_parquet(f"{folder}/lists.parquet", frame)
    warehouse.write_json(f"{folder}/validation.json", {"passed": True, "failures": []})
    if activate:
        activate_version(warehouse, root, version, generated_at, ttl)
    return version


def activate_version(
    warehouse: Warehouse, root: str, version: str, generated_at: datetime, ttl: timedelta
) -> None:
    surface, region = (part.split("=", 1)[1] for part in root.rsplit("/", 2)[-2:])
    warehouse.write_json(
        f"{root}/manifest.json",
        {
            "surface": surface,
            "region": region,
            "active_version": version,
            "active_path": f"{root}/versions/{version}",
            "generated_at": generated_at.isoformat(),
            "expires_at": (generated_at + ttl).isoformat(),
            "lineage": {"model_version": "model_a"},
            "validation": {"passed": True, "metrics": {}, "failures": []},
            "updated_at": generated_at.isoformat(),
            "history": [
                {
                    "version": version,
                    "path": f"{root}/versions/{version}",
                    "status": "active",
                    "generated_at": generated_at.isoformat(),
                    "expires_at": (generated_at + ttl).isoformat(),
                    "published_at": generated_at.isoformat(),
                    "reason": "test",
                }
            ],
        },
    )
