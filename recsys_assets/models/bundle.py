"""The versioned model bundle: two-tower retrieval, collaborative model, ranker, calibrator.

Training window: everything strictly before the cutoff, which is the raw snapshot's
`as_of` (or an explicit `as_of`). Every table is cut at the cutoff before any model sees
it, so nothing after it can leak in. `training.cutoff_days_before_snapshot` is left to
offline evaluation, which holds out the days after its own cutoff.

Inside the window, a per-user holdout (`training.holdout` of each user's latest
interactions, `data.holdout`) gives the task the lists are judged on:

1. on its training part, the retrieval models are fitted (two-tower; EASE with λ chosen
   on the holdout), their recall on the held-out positives is reported, and the candidate
   pools of a sample of users are built and labelled with what they did next
   (`pipeline.training_rows`): the ranker learns on candidate-pool rows and the calibrator
   is fitted on its validation subjects;
2. the served retrieval models are then fitted again on the *whole* window, so every user
   has a vector and a history, and the newest interactions count.

Layout (warehouse-relative): `models/<model_version>/{two_tower.pt, collaborative.npz,
ranker.pt, calibration.json, bundle.json}`, then `models/current.json` last, so a reader
that finds current.json finds a complete bundle. A version folder is never rewritten:
`model_version` is `mb_<UTC YYYYmmddTHHMMSS>_<content hash8>`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import torch

from recsys_assets.config import Settings
from recsys_assets.data import read_raw, read_snapshot
from recsys_assets.data.holdout import temporal_holdout
from recsys_assets.models.calibration import Calibrator, fit_calibrator
from recsys_assets.models.collaborative import (
    CollaborativeModel,
    fit_collaborative,
    tune_collaborative,
)
from recsys_assets.models.device import pick_device, seed_everything
from recsys_assets.models.ranker import RankerConfig, RankerModel, train_ranker
from recsys_assets.models.two_tower import (
    TwoTowerConfig,
    TwoTowerModel,
    retrieval_recall,
    train_two_tower,
)
from recsys_assets.pipeline.features import FEATURE_SET_VERSION
from recsys_assets.pipeline.training_rows import (
    RetrievalModels,
    pool_training_rows,
    training_surface,
)
from recsys_assets.warehouse import Warehouse

MODELS_PREFIX = "models"
CURRENT_PATH = f"{MODELS_PREFIX}/current.json"
TWO_TOWER_FILE = "two_tower.pt"
COLLABORATIVE_FILE = "collaborative.npz"
RANKER_FILE = "ranker.pt"
CALIBRATION_FILE = "calibration.json"
BUNDLE_FILE = "bundle.json"


class BundleMissing(FileNotFoundError):
    """No model bundle (or not the requested version) in the warehouse."""


@dataclass(frozen=True)
class BundleInfo:
    """What bundle.json records: identity, provenance, window and offline metrics."""

    model_version: str
    feature_set_version: str
    training_window: dict[str, str]
    data_snapshot: str
    metrics: dict[str, float]
    device: str
    seed: int
    created_at: str
    path: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleInfo:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


@dataclass
class ModelBundle:
    """A loaded bundle: what scoring and retrieval need, plus its metadata."""

    two_tower: TwoTowerModel
    collaborative: CollaborativeModel
    ranker: RankerModel
    calibrator: Calibrator
    info: BundleInfo

    def score(self, features: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(raw prediction, calibrated probability) per feature row."""
        prediction = self.ranker.predict(features)
        return prediction, self.calibrator.transform(prediction)

    def score_matrix(
        self, matrix: np.ndarray, *, columns: tuple[str, ...], feature_set_version: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(raw prediction, calibrated probability) per row of a gathered feature matrix."""
        prediction = self.ranker.predict_matrix(
            matrix, columns=columns, feature_set_version=feature_set_version
        )
        return prediction, self.calibrator.transform(prediction)


def training_cutoff(snapshot: dict[str, Any], as_of: pd.Timestamp | None = None) -> pd.Timestamp:
    """`as_of` if given, else the snapshot's as_of (else its created_at), naive UTC."""
    chosen = as_of if as_of is not None else snapshot.get("as_of") or snapshot.get("created_at")
    if chosen is None:
        raise ValueError("raw/_snapshot.json has neither as_of nor created_at: re-seed or import")
    stamp = pd.Timestamp(chosen)
    return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp


def train_bundle(
    warehouse: Warehouse,
    settings: Settings,
    *,
    as_of: pd.Timestamp | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    device: torch.device | None = None,
) -> BundleInfo:
    """Train the retrieval models, then the ranker on candidate pools, then calibration.

    Deterministic per `settings.training.seed` (same data, same device → same weights and
    the same content hash). `con` is the DuckDB connection for the features (the asset
    passes its per-step one); an in-memory one otherwise.
    """
    training = settings.training
    seed_everything(training.seed)
    device = torch.device(device) if device is not None else pick_device()
    snapshot = read_snapshot(warehouse)
    cutoff = training_cutoff(snapshot, as_of)
    tables = {
        table: _before(read_raw(warehouse, table), cutoff)
        for table in ("interactions", "exposures", "user_controls")
    }
    tables.update({table: read_raw(warehouse, table) for table in ("users", "items", "editorial")})
    interactions = tables["interactions"]
    if interactions.empty:
        raise ValueError(
            f"no interactions before the training cutoff {cutoff} in {warehouse.uri('raw')}: "
            "seed or import data, or pass a later as_of"
        )
    items = tables["items"]
    window_start = pd.Timestamp(interactions["ts"].min())
    nested = temporal_holdout(interactions, holdout=training.holdout, seed=training.seed)
    two_tower_config = TwoTowerConfig(
        embedding_dim=training.embedding_dim, epochs=training.epochs, seed=training.seed
    )

    # 1. Models as of the holdout: the ranker's training pools, and the reported recall.
    inner_collaborative = tune_collaborative(
        nested.train, nested.relevant, max_items=training.collaborative_max_items
    )
    inner_two_tower = train_two_tower(
        nested.train, items, cutoff=cutoff, config=two_tower_config, device=device
    )
    rows = pool_training_rows(
        con if con is not None else duckdb.connect(":memory:"),
        nested,
        tables=tables,
        models=RetrievalModels(inner_two_tower.model, inner_collaborative),
        settings=settings,
    )
    ranker = train_ranker(
        rows,
        validation_fraction=training.validation_fraction,
        k=training_surface(settings).display_count,
        config=RankerConfig(seed=training.seed),
        device=device,
    )
    calibrator, calibration = fit_calibrator(
        ranker.validation.labels, ranker.validation.predictions, ranker.validation.score_time
    )

    # 2. The served retrieval models, on the whole window.
    collaborative = fit_collaborative(
        interactions, l2=inner_collaborative.l2, max_items=training.collaborative_max_items
    )
    two_tower = train_two_tower(
        interactions, items, cutoff=cutoff, config=two_tower_config, device=device
    )
    recall = retrieval_recall(
        inner_two_tower.model,
        nested.train,
        nested.relevant,
        items["item_id"].to_numpy(dtype=np.int64),
        max_users=two_tower_config.max_validation_users,
        seed=training.seed,
    )
    labelled = rows["label"].to_numpy(dtype=np.float64) if len(rows) else np.zeros(0)
    metrics = {
        **{f"two_tower_{name}": float(value) for name, value in recall.items()},
        **{f"two_tower_{name}": float(value) for name, value in two_tower.metrics.items()},
        "collaborative_l2": collaborative.l2,
        "collaborative_items": float(collaborative.size),
        "ranker_training_subjects": float(rows["subject_id"].nunique()) if len(rows) else 0.0,
        "ranker_pool_recall": float(labelled.sum() / max(len(nested.relevant), 1)),
        "ranker_auc": ranker.metrics["auc"],
        "ranker_log_loss": ranker.metrics["log_loss"],
        "ranker_log_loss_before_calibration": calibration.log_loss_before,
        "ranker_log_loss_after_calibration": calibration.log_loss_after,
        "ranker_ece_before_calibration": calibration.ece_before,
        "ranker_ece_after_calibration": calibration.ece_after,
        "ranker_train_rows": ranker.metrics["train_rows"],
        "ranker_validation_rows": ranker.metrics["validation_rows"],
        "ranker_validation_recall": ranker.metrics["validation_recall"],
        "ranker_validation_recall_network": ranker.metrics["validation_recall_network"],
        "ranker_validation_recall_prior_alone": ranker.metrics["validation_recall_prior_alone"],
        "ranker_prior_weight": ranker.metrics["prior_weight"],
    }
    artifacts = {
        TWO_TOWER_FILE: two_tower.model.to_bytes(),
        COLLABORATIVE_FILE: collaborative.to_bytes(),
        RANKER_FILE: ranker.model.to_bytes(),
        CALIBRATION_FILE: calibrator.to_json().encode("utf-8"),
    }
    created_at = datetime.now(UTC).replace(tzinfo=None)
    content = hashlib.sha256()
    for name in sorted(artifacts):
        content.update(name.encode())
        content.update(hashlib.sha256(artifacts[name]).digest())
    model_version = f"mb_{created_at:%Y%m%dT%H%M%S}_{content.hexdigest()[:8]}"
    folder = f"{MODELS_PREFIX}/{model_version}"
    info = BundleInfo(
        model_version=model_version,
        feature_set_version=FEATURE_SET_VERSION,
        training_window={
            "start": window_start.isoformat(),
            "holdout_split": nested.split_time.isoformat(),
            "cutoff": cutoff.isoformat(),
        },
        data_snapshot=str(snapshot.get("snapshot_id", "")),
        metrics={name: _finite_or_none(value) for name, value in metrics.items()},
        device=str(device),
        seed=training.seed,
        created_at=created_at.isoformat(),
        path=folder,
        files={name: hashlib.sha256(data).hexdigest() for name, data in artifacts.items()},
    )
    for name, data in artifacts.items():
        warehouse.write_bytes(f"{folder}/{name}", data)
    warehouse.write_json(f"{folder}/{BUNDLE_FILE}", info.to_dict())
    warehouse.write_json(
        CURRENT_PATH,
        {"model_version": model_version, "path": folder, "updated_at": created_at.isoformat()},
    )
    return info


def current_model_version(warehouse: Warehouse) -> str | None:
    """The model_version models/current.json names, or None before the first bundle."""
    if not warehouse.exists(CURRENT_PATH):
        return None
    return str(warehouse.read_json(CURRENT_PATH)["model_version"])


def load_bundle(
    warehouse: Warehouse,
    model_version: str | None = None,
    *,
    device: torch.device | None = None,
) -> ModelBundle:
    """The bundle `model_version`, or the current one; BundleMissing says what to do."""
    version = model_version or current_model_version(warehouse)
    if version is None:
        raise BundleMissing(
            f"no model bundle in {warehouse.uri(MODELS_PREFIX)} (no current.json): "
            "materialize model_bundle first"
        )
    folder = f"{MODELS_PREFIX}/{version}"
    if not warehouse.exists(f"{folder}/{BUNDLE_FILE}"):
        known = [name for name in warehouse.list_dirs(MODELS_PREFIX) if name.startswith("mb_")]
        raise BundleMissing(
            f"model bundle {version!r} not found in {warehouse.uri(MODELS_PREFIX)} "
            f"(available: {known}); materialize model_bundle first or pick an available one"
        )
    info = BundleInfo.from_dict(warehouse.read_json(f"{folder}/{BUNDLE_FILE}"))
    device = torch.device(device) if device is not None else pick_device()
    return ModelBundle(
        two_tower=TwoTowerModel.from_bytes(warehouse.read_bytes(f"{folder}/{TWO_TOWER_FILE}")),
        collaborative=CollaborativeModel.from_bytes(
            warehouse.read_bytes(f"{folder}/{COLLABORATIVE_FILE}")
        ),
        ranker=RankerModel.from_bytes(
            warehouse.read_bytes(f"{folder}/{RANKER_FILE}"), device=device
        ),
        calibrator=Calibrator.from_json(warehouse.read_bytes(f"{folder}/{CALIBRATION_FILE}")),
        info=info,
    )


def _before(frame: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    return frame.loc[(pd.to_datetime(frame["ts"]) < cutoff).to_numpy()].reset_index(drop=True)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (one class in validation) is stored as null."""
    number = float(value)
    return number if np.isfinite(number) else None
