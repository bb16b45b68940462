"""The ranker: a small MLP over FEATURE_COLUMNS, trained on point-in-time labelled pairs.

Training rows go through `compute_features` with score_time = the label's event time, the
same code that builds scoring rows with score_time = now, so training and serving features
cannot drift apart. Positives are clicks, purchases and ratings >= 4 before the cutoff;
each gets `negatives_per_positive` items drawn by popularity at the same timestamp, among
items that existed then and that the subject had not interacted with before. The split is
by time: rows at or after the instant that leaves the newest `validation_fraction` of the
interactions validate (AUC, log loss) and are what the calibrator is fitted on; the
two-tower model splits at the same instant.

Features pass through a signed log1p (counts are heavy-tailed) and a standardisation whose
statistics live in the model, so a loaded model needs nothing but the feature frame.
Features constant in training (e.g. source ranks and the embedding dot, which logged
events do not carry) get a zero scale: they cannot move a prediction at scoring time
through weights never trained.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys_assets.models.calibration import log_loss, roc_auc
from recsys_assets.models.device import pick_device, seed_everything
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION, compute_features

POSITIVE_EVENTS = ("click", "purchase")
POSITIVE_RATING = 4.0
TRAINING_SURFACE = "home_feed"
"""Surface whose exposures feed the frequency features of training rows."""
_OVERSAMPLE = 3
UNIFORM_NEGATIVE_SHARE = 0.8
_MIN_SCALE = 1e-6


class RankerTrainingError(ValueError):
    """The training window holds too little labelled data to train or validate a ranker."""


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and training knobs; the defaults train on tiny data in about a second."""

    hidden_sizes: tuple[int, ...] = (64, 32)
    epochs: int = 4
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
    negatives_per_positive: int = 4
    max_positives: int = 100_000
    seed: int = 7


class _Network(nn.Module):
    """Signed log1p → standardise (stored statistics) → MLP → logit."""

    def __init__(self, feature_count: int, hidden_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(feature_count))
        self.register_buffer("inverse_scale", torch.ones(feature_count))
        layers: list[nn.Module] = []
        width = feature_count
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    @staticmethod
    def transform(features: torch.Tensor) -> torch.Tensor:
        return torch.sign(features) * torch.log1p(features.abs())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardised = (self.transform(features) - self.center) * self.inverse_scale
        return self.mlp(standardised).squeeze(-1)

    def fit_standardisation(self, features: torch.Tensor) -> None:
        transformed = self.transform(features)
        center = transformed.mean(dim=0)
        spread = transformed.std(dim=0, unbiased=False)
        constant = spread < _MIN_SCALE
        self.center.copy_(torch.where(constant, torch.zeros_like(center), center))
        self.inverse_scale.copy_(
            torch.where(constant, torch.zeros_like(spread), 1.0 / spread.clamp_min(_MIN_SCALE))
        )


class RankerModel:
    """A trained ranker: raw engagement probabilities for feature rows."""

    def __init__(
        self,
        network: _Network,
        *,
        hidden_sizes: tuple[int, ...],
        feature_columns: tuple[str, ...] = tuple(FEATURE_COLUMNS),
        feature_set_version: str = FEATURE_SET_VERSION,
        device: torch.device | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else pick_device()
        self.network = network.to(self.device).eval()
        self.hidden_sizes = tuple(hidden_sizes)
        self.feature_columns = tuple(feature_columns)
        self.feature_set_version = feature_set_version

    def predict(self, features: pd.DataFrame, *, batch_size: int = 65_536) -> np.ndarray:
        """Raw probabilities (float32), one per row of `features`, in row order."""
        matrix = self._matrix(features)
        out = np.empty(len(matrix), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(matrix), batch_size):
                batch = torch.from_numpy(matrix[start : start + batch_size]).to(self.device)
                out[start : start + batch_size] = (
                    torch.sigmoid(self.network(batch)).float().cpu().numpy()
                )
        return out

    def _matrix(self, features: pd.DataFrame) -> np.ndarray:
        missing = [name for name in self.feature_columns if name not in features.columns]
        if missing:
            raise ValueError(
                f"feature frame lacks {len(missing)} ranker input(s), e.g. {missing[:5]}; "
                "build it with recsys_assets.pipeline.features.compute_features"
            )
        if "feature_set_version" in features.columns and len(features):
            versions = set(features["feature_set_version"].unique())
            if versions != {self.feature_set_version}:
                raise ValueError(
                    f"features have feature_set_version {sorted(versions)} but the ranker was "
                    f"trained on {self.feature_set_version!r}: rematerialize model_bundle"
                )
        return np.ascontiguousarray(features[list(self.feature_columns)].to_numpy(dtype=np.float32))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "state_dict": {k: v.cpu() for k, v in self.network.state_dict().items()},
                "hidden_sizes": list(self.hidden_sizes),
                "feature_columns": list(self.feature_columns),
                "feature_set_version": self.feature_set_version,
            },
            buffer,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, device: torch.device | None = None) -> RankerModel:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        hidden_sizes = tuple(int(size) for size in saved["hidden_sizes"])
        network = _Network(len(saved["feature_columns"]), hidden_sizes)
        network.load_state_dict(saved["state_dict"])
        return cls(
            network,
            hidden_sizes=hidden_sizes,
            feature_columns=tuple(saved["feature_columns"]),
            feature_set_version=str(saved["feature_set_version"]),
            device=device,
        )


@dataclass
class ValidationScores:
    """The validation split's labels and raw predictions, in time order (for calibration)."""

    labels: np.ndarray
    predictions: np.ndarray
    score_time: np.ndarray


@dataclass
class RankerResult:
    model: RankerModel
    metrics: dict[str, float]
    validation: ValidationScores = field(repr=False)
    window: dict[str, pd.Timestamp] = field(default_factory=dict)


def positive_events(interactions: pd.DataFrame, *, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Clicks, purchases and ratings >= 4 strictly before `cutoff`: (subject_id, item_id, ts)."""
    before = interactions[pd.to_datetime(interactions["ts"]) < cutoff]
    positive = before["event_type"].isin(POSITIVE_EVENTS) | (
        (before["event_type"] == "rating") & (before["value"] >= POSITIVE_RATING)
    )
    chosen = before.loc[positive.to_numpy(), ["user_id", "item_id", "ts"]]
    return chosen.rename(columns={"user_id": "subject_id", "ts": "score_time"}).reset_index(
        drop=True
    )


def training_pairs(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    *,
    cutoff: pd.Timestamp,
    negatives_per_positive: int,
    max_positives: int,
    seed: int,
) -> pd.DataFrame:
    """Labelled (subject_id, item_id, score_time, label) rows, built point-in-time.

    Negatives share their positive's timestamp and are drawn from a mixture: with
    probability UNIFORM_NEGATIVE_SHARE uniformly over the catalog, otherwise by popularity
    (engagements before the cutoff, +1), among items created before that time that the
    subject had not interacted with before it. Popularity-only negatives would teach the
    ranker that popular items are bad (they are over-represented among negatives), which
    measurably inverted its popularity signal in offline evaluation (`recsys evaluate`:
    home_feed Recall@20 on seeded small data 0.17 with popularity-only negatives, 0.28 at
    share 0.5, 0.30 at 0.8; on a MovieLens-style import 0.04, 0.20, 0.23).

    Beyond `max_positives` positives, a seeded uniform sample of them is kept: it spans the
    whole window, so the time split (`validation_start`) leaves rows on both sides of it.
    Keeping the newest ones instead put every kept positive in the validation split once
    the window held more than about max_positives / validation_fraction positives.
    """
    positives = positive_events(interactions, cutoff=cutoff)
    if positives.empty:
        raise RankerTrainingError(
            f"no clicks, purchases or ratings >= {POSITIVE_RATING:g} before {cutoff}: "
            "seed or import interactions first"
        )
    rng = np.random.default_rng(seed)
    if len(positives) > max_positives:
        kept = np.sort(rng.choice(len(positives), size=max_positives, replace=False))
        positives = positives.iloc[kept]
    positives = positives.sort_values("score_time", kind="stable").reset_index(drop=True)
    item_ids = items["item_id"].to_numpy(dtype=np.int64)
    engaged = interactions.loc[
        (interactions["event_type"] != "hide").to_numpy()
        & (pd.to_datetime(interactions["ts"]) < cutoff).to_numpy(),
        "item_id",
    ]
    popularity = (
        engaged.value_counts().reindex(item_ids, fill_value=0).to_numpy(dtype=np.float64) + 1.0
    )
    draws = negatives_per_positive * _OVERSAMPLE
    mixture = (1.0 - UNIFORM_NEGATIVE_SHARE) * popularity / popularity.sum() + (
        UNIFORM_NEGATIVE_SHARE / len(item_ids)
    )
    drawn = rng.choice(item_ids, size=(len(positives), draws), p=mixture)
    candidates = pd.DataFrame(
        {
            "positive": np.repeat(np.arange(len(positives)), draws),
            "subject_id": np.repeat(positives["subject_id"].to_numpy(dtype=np.int64), draws),
            "item_id": drawn.ravel(),
            "score_time": np.repeat(positives["score_time"].to_numpy(), draws),
        }
    )
    first_touch = (
        interactions.groupby(["user_id", "item_id"], sort=False)["ts"]
        .min()
        .rename("first_touch")
        .reset_index()
        .rename(columns={"user_id": "subject_id"})
    )
    created = items[["item_id", "created_at"]]
    candidates = candidates.merge(first_touch, on=["subject_id", "item_id"], how="left")
    candidates = candidates.merge(created, on="item_id", how="left")
    untouched = candidates["first_touch"].isna() | (
        candidates["first_touch"] > candidates["score_time"]
    )
    existed = candidates["created_at"] < candidates["score_time"]
    valid = candidates[(untouched & existed).to_numpy()]
    valid = valid.drop_duplicates(subset=["positive", "item_id"])
    valid = valid[valid.groupby("positive").cumcount() < negatives_per_positive]
    negatives = valid[["subject_id", "item_id", "score_time"]].assign(label=np.float32(0))
    labelled = pd.concat(
        [positives.assign(label=np.float32(1)), negatives], ignore_index=True
    ).sort_values(["score_time", "subject_id", "label"], kind="stable", ignore_index=True)
    labelled["subject_id"] = labelled["subject_id"].astype(np.int64)
    labelled["item_id"] = labelled["item_id"].astype(np.int64)
    labelled["score_time"] = pd.to_datetime(labelled["score_time"]).astype("datetime64[ns]")
    return labelled


def validation_start(
    interactions: pd.DataFrame, cutoff: pd.Timestamp, validation_fraction: float
) -> pd.Timestamp:
    """Start of the validation split: the newest `validation_fraction` of the interactions
    before the cutoff, by time (the same instant the two-tower model splits at)."""
    before = pd.to_datetime(interactions["ts"])
    return pd.Timestamp(before[before < cutoff].quantile(1.0 - validation_fraction))


def train_ranker(
    con: duckdb.DuckDBPyConnection,
    *,
    interactions: pd.DataFrame,
    exposures: pd.DataFrame,
    items: pd.DataFrame,
    cutoff: pd.Timestamp,
    validation_fraction: float,
    config: RankerConfig | None = None,
    user_controls: pd.DataFrame | None = None,
    surface: str = TRAINING_SURFACE,
    device: torch.device | None = None,
) -> RankerResult:
    """Train on rows before the validation start, validate on the rest of the window.

    Training pairs carry no retrieval_score, so the embedding-dot features are constant in
    training and, with a zero scale, unused at scoring time.
    """
    config = config or RankerConfig()
    seed_everything(config.seed)
    device = torch.device(device) if device is not None else pick_device()
    pairs = training_pairs(
        interactions,
        items,
        cutoff=cutoff,
        negatives_per_positive=config.negatives_per_positive,
        max_positives=config.max_positives,
        seed=config.seed,
    )
    features = compute_features(
        con,
        pairs,
        interactions=interactions,
        exposures=exposures,
        items=items,
        surface=surface,
        user_controls=user_controls,
    )
    times = pd.to_datetime(interactions["ts"])
    window_start = pd.Timestamp(times[times < cutoff].min())
    split_at = validation_start(interactions, cutoff, validation_fraction)
    is_validation = (features["score_time"] >= split_at).to_numpy()
    labels = features["label"].to_numpy(dtype=np.float32)
    _require_both_classes(labels[~is_validation], "training", window_start, split_at)
    _require_both_classes(labels[is_validation], "validation", split_at, cutoff)

    matrix = features[FEATURE_COLUMNS].to_numpy(dtype=np.float32)
    network = _fit(matrix[~is_validation], labels[~is_validation], config, device)
    model = RankerModel(network, hidden_sizes=config.hidden_sizes, device=device)
    validation_rows = features.loc[is_validation]
    predictions = model.predict(validation_rows)
    validation_labels = labels[is_validation]
    metrics = {
        "auc": roc_auc(validation_labels, predictions),
        "log_loss": log_loss(validation_labels, predictions),
        "train_rows": float((~is_validation).sum()),
        "validation_rows": float(is_validation.sum()),
        "validation_positive_rate": float(validation_labels.mean()),
    }
    return RankerResult(
        model=model,
        metrics=metrics,
        validation=ValidationScores(
            labels=validation_labels,
            predictions=predictions,
            score_time=validation_rows["score_time"].to_numpy(),
        ),
        window={"start": window_start, "validation_start": split_at, "cutoff": cutoff},
    )


def _require_both_classes(
    labels: np.ndarray, split: str, start: pd.Timestamp, end: pd.Timestamp
) -> None:
    if len(labels) == 0 or labels.min() == labels.max():
        raise RankerTrainingError(
            f"the {split} split [{start}, {end}) has {len(labels)} row(s) and not both "
            "positives and negatives: widen the window (more interactions before the cutoff) "
            "or change training.validation_fraction"
        )


@contextmanager
def _single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    """Train the small MLP on one CPU thread.

    Its matmuls are tiny, so intra-op threads only add synchronisation; on a busy machine
    that made training 30-70× slower (0.35 s on one thread vs 11-25 s on two).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(
    matrix: np.ndarray, labels: np.ndarray, config: RankerConfig, device: torch.device
) -> _Network:
    with _single_threaded_on_cpu(device):
        return _train(matrix, labels, config, device)


def _train(
    matrix: np.ndarray, labels: np.ndarray, config: RankerConfig, device: torch.device
) -> _Network:
    network = _Network(matrix.shape[1], config.hidden_sizes).to(device)
    features = torch.from_numpy(matrix).to(device)
    targets = torch.from_numpy(labels).to(device)
    network.fit_standardisation(features)
    optimiser = torch.optim.Adam(
        network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(config.seed)
    network.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(features), generator=shuffle).to(device)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(features[batch]), targets[batch])
            loss.backward()
            optimiser.step()
    return network.eval()
