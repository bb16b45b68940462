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
   is fitted on its validation subjects; on those rows the deviation of bf16 inference
   from fp32 is measured and recorded (`inference` in bundle.json), which decides whether
   scoring may run in bf16 (`scoring_precision`);
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
from recsys_assets.models.ranker import (
    PRECISIONS,
    RankerConfig,
    RankerModel,
    ValidationScores,
    train_ranker,
)
from recsys_assets.models.two_tower import (
    TwoTowerConfig,
    TwoTowerModel,
    retrieval_recall,
    train_two_tower,
)
from recsys_assets.pipeline.features import FEATURE_SET_VERSION
from recsys_assets.pipeline.runs import rank_within_runs
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


BF16_MAX_ABS_DIFF_TOLERANCE = 0.02
"""Largest change of a calibrated probability that bf16 inference may make on any
validation row for a bundle to allow it."""
BF16_TOPK_OVERLAP_TOLERANCE = 0.98
"""Smallest mean share of a validation subject's fp32 top-k that bf16 must keep."""
SCORING_PRECISION_KEY = "pipeline.scoring_precision"


class BundleMissing(FileNotFoundError):
    """No model bundle (or not the requested version) in the warehouse."""


class ScoringPrecisionError(ValueError):
    """The configured scoring precision is one the bundle does not allow."""


@dataclass(frozen=True)
class InferencePrecision:
    """How bf16 inference deviates from fp32 on the bundle's validation rows (bundle.json
    `inference`). A bundle written before this was measured loads with the defaults: bf16
    not allowed."""

    bf16_allowed: bool = False
    bf16_max_abs_diff: float | None = None
    """Largest |bf16 − fp32| of the calibrated probability over the validation rows."""
    bf16_p99_abs_diff: float | None = None
    bf16_topk_overlap: float | None = None
    """Mean over validation subjects of the share of their fp32 top-k that bf16 keeps."""
    bf16_topk_same_order: float | None = None
    """Share of validation subjects whose top-k is the same items in the same order."""
    k: int = 0
    validation_rows: int = 0
    measured_on: str = ""
    """The device the deviation was measured on (bf16 kernels differ by device)."""
    tolerance: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InferencePrecision:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    def describe(self) -> str:
        """The measurement against its tolerance, for error messages and docs."""
        if self.bf16_max_abs_diff is None:
            return "it records no bf16 measurement (trained before bundles recorded one)"
        return (
            f"on {self.validation_rows:,} validation rows bf16 moved calibrated probabilities "
            f"by up to {self.bf16_max_abs_diff:.4g} (p99 {self.bf16_p99_abs_diff:.4g}) and "
            f"kept {self.bf16_topk_overlap:.4g} of each subject's top-{self.k} "
            f"(tolerance: at most {self.tolerance.get('max_abs_diff')}, "
            f"at least {self.tolerance.get('topk_overlap')})"
        )


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
    inference: InferencePrecision = field(default_factory=InferencePrecision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleInfo:
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        fields["inference"] = InferencePrecision.from_dict(data.get("inference") or {})
        return cls(**fields)


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
        self,
        matrix: np.ndarray,
        *,
        columns: tuple[str, ...],
        feature_set_version: str,
        batch_size: int = 65_536,
        pad_last: bool = False,
        precision: str = "fp32",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(raw prediction, calibrated probability) per row of a gathered feature matrix;
        `batch_size`, `pad_last` and `precision` as `RankerModel.predict_matrix` takes them
        (`scoring_precision` picks the precision)."""
        prediction = self.ranker.predict_matrix(
            matrix,
            columns=columns,
            feature_set_version=feature_set_version,
            batch_size=batch_size,
            pad_last=pad_last,
            precision=precision,
        )
        return prediction, self.calibrator.transform(prediction)


def scoring_precision(requested: str, bundle: ModelBundle) -> str:
    """The precision to score with for `pipeline.scoring_precision` = `requested`.

    `auto`: bf16 only on CUDA and only when the bundle allows it, else fp32 (the CPU stays
    fp32). `fp32`: fp32. `bf16`: bf16 on any device, refused when the bundle's measured
    deviation is over the tolerance or was never measured.
    """
    allowed = bundle.info.inference.bf16_allowed
    if requested == "auto":
        return "bf16" if bundle.ranker.device.type == "cuda" and allowed else "fp32"
    if requested == "bf16" and not allowed:
        raise ScoringPrecisionError(
            f"{SCORING_PRECISION_KEY} is 'bf16' but model bundle "
            f"{bundle.info.model_version} does not allow bf16: "
            f"{bundle.info.inference.describe()}; set {SCORING_PRECISION_KEY} to auto or "
            "fp32, or retrain model_bundle"
        )
    if requested not in PRECISIONS:
        raise ScoringPrecisionError(
            f"{SCORING_PRECISION_KEY} is {requested!r}; use one of {['auto', *PRECISIONS]}"
        )
    return requested


def measure_bf16(
    ranker: RankerModel, calibrator: Calibrator, validation: ValidationScores, k: int
) -> InferencePrecision:
    """Score the validation rows in fp32 and in bf16 on the ranker's device and compare the
    calibrated probabilities: largest and p99 absolute difference, and per subject how much
    of the fp32 top-k bf16 keeps (and in the same order). bf16 is allowed when the largest
    difference and the top-k overlap are within BF16_*_TOLERANCE."""
    fp32, bf16 = (
        calibrator.transform(ranker.predict_matrix(validation.features, precision=precision))
        for precision in PRECISIONS
    )
    difference = np.abs(bf16.astype(np.float64) - fp32.astype(np.float64))
    fp32_rank = _rank_within_subject(fp32, validation.subjects)
    bf16_rank = _rank_within_subject(bf16, validation.subjects)
    in_top = fp32_rank < k
    subject_codes = np.unique(validation.subjects, return_inverse=True)[1]
    kept = np.bincount(subject_codes, weights=in_top & (bf16_rank < k))
    same = np.bincount(subject_codes, weights=in_top & (bf16_rank != fp32_rank)) == 0
    overlap = kept / np.bincount(subject_codes, weights=in_top)
    measured = {
        "bf16_max_abs_diff": float(difference.max()),
        "bf16_p99_abs_diff": float(np.quantile(difference, 0.99)),
        "bf16_topk_overlap": float(overlap.mean()),
        "bf16_topk_same_order": float(same.mean()),
    }
    return InferencePrecision(
        bf16_allowed=measured["bf16_max_abs_diff"] <= BF16_MAX_ABS_DIFF_TOLERANCE
        and measured["bf16_topk_overlap"] >= BF16_TOPK_OVERLAP_TOLERANCE,
        **measured,
        k=k,
        validation_rows=len(difference),
        measured_on=str(ranker.device),
        tolerance={
            "max_abs_diff": BF16_MAX_ABS_DIFF_TOLERANCE,
            "topk_overlap": BF16_TOPK_OVERLAP_TOLERANCE,
        },
    )


def _rank_within_subject(scores: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """Each row's 0-based rank among its subject's rows by descending score (ties: row
    order)."""
    order = np.lexsort((-scores, subjects))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = rank_within_runs(subjects[order])
    return rank


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
    inference = measure_bf16(
        ranker.model, calibrator, ranker.validation, k=training_surface(settings).display_count
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
        inference=inference,
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
