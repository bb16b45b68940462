"""The ranker: a small MLP over FEATURE_COLUMNS, trained on candidate-pool rows.

Learning to rank the way production systems do it: the training rows are candidate pools
built by the pipeline's own code as of an earlier moment (a per-user holdout of the bundle's
window, `models/bundle.py`), with the same features scoring uses, labelled 1 where the
subject engaged positively with the item afterwards (`rules.engagement.positive_signal`).
So the ranker sees exactly the rows it will score — retrieval scores, source ranks and
history scores included — and learns how much each source's evidence is worth. Logged
events with sampled negatives (the earlier design) carry none of that: every retrieval
input was constant in training, and the ranker reduced to popularity.

The loss is pointwise (binary cross-entropy): the calibrated probability is the relevance
of the utility, so the prediction must be a probability, and on MovieLens 100k a listwise
softmax per subject ranked no better (docs/EVALUATION.md).

Features pass through a signed log1p (counts are heavy-tailed) and a standardisation whose
statistics live in the model, so a loaded model needs nothing but the feature frame.
Features constant in training get a zero scale: they cannot move a prediction at scoring
time through weights never trained.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from recsys_assets.models.calibration import log_loss, roc_auc
from recsys_assets.models.device import pick_device, seed_everything
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION

_MIN_SCALE = 1e-6


class RankerTrainingError(ValueError):
    """The training window holds too little labelled data to train or validate a ranker."""


@dataclass(frozen=True)
class RankerConfig:
    """Architecture and training knobs; the defaults train on tiny data in about a second."""

    hidden_sizes: tuple[int, ...] = (64, 32)
    epochs: int = 8
    batch_size: int = 1024
    learning_rate: float = 3e-3
    weight_decay: float = 1e-5
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
    """The validation split's labels and raw predictions (for calibration)."""

    labels: np.ndarray
    predictions: np.ndarray
    score_time: np.ndarray
    """The order the calibration report splits on (earlier half fits, later half reports)."""


@dataclass
class RankerResult:
    model: RankerModel
    metrics: dict[str, float]
    validation: ValidationScores = field(repr=False)


def train_ranker(
    rows: pd.DataFrame,
    *,
    validation_fraction: float,
    config: RankerConfig | None = None,
    device: torch.device | None = None,
) -> RankerResult:
    """Train on labelled candidate-pool rows; validate on a seeded share of the subjects.

    `rows` are FEATURE_COLUMNS plus `subject_id` and `label` (1 = the subject engaged with
    the item after the pools were built), as `pipeline.training_rows.pool_training_rows`
    makes them. The validation subjects' rows never train the network: they give AUC and
    log loss and are what the calibrator is fitted on.
    """
    config = config or RankerConfig()
    seed_everything(config.seed)
    device = torch.device(device) if device is not None else pick_device()
    subjects = np.unique(rows["subject_id"].to_numpy(dtype=np.int64))
    rng = np.random.default_rng(config.seed)
    held = rng.permutation(subjects)[: max(1, round(len(subjects) * validation_fraction))]
    is_validation = rows["subject_id"].isin(held).to_numpy()
    labels = rows["label"].to_numpy(dtype=np.float32)
    _require_both_classes(labels[~is_validation], "training", len(subjects) - len(held))
    _require_both_classes(labels[is_validation], "validation", len(held))

    matrix = rows[FEATURE_COLUMNS].to_numpy(dtype=np.float32)
    network = _fit(matrix[~is_validation], labels[~is_validation], config, device)
    model = RankerModel(network, hidden_sizes=config.hidden_sizes, device=device)
    validation_rows = rows.loc[is_validation]
    predictions = model.predict(validation_rows)
    validation_labels = labels[is_validation]
    metrics = {
        "auc": roc_auc(validation_labels, predictions),
        "log_loss": log_loss(validation_labels, predictions),
        "train_rows": float((~is_validation).sum()),
        "validation_rows": float(is_validation.sum()),
        "validation_positive_rate": float(validation_labels.mean()),
    }
    # Calibration is reported on a later half of the validation rows: order them by a
    # seeded shuffle of their subjects, so both halves hold whole, random subjects.
    subject_order = pd.Series(rng.permutation(len(held)), index=np.sort(held))
    return RankerResult(
        model=model,
        metrics=metrics,
        validation=ValidationScores(
            labels=validation_labels,
            predictions=predictions,
            score_time=subject_order.reindex(validation_rows["subject_id"]).to_numpy(),
        ),
    )


def _require_both_classes(labels: np.ndarray, split: str, subjects: int) -> None:
    if len(labels) == 0 or labels.min() == labels.max():
        raise RankerTrainingError(
            f"the ranker's {split} split ({subjects} subject(s), {len(labels)} candidate "
            "row(s)) has not both engaged and unengaged candidates: the training window needs "
            "more users whose later interactions hit their candidate pools (more data, or a "
            "larger training.holdout / training.validation_fraction)"
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
