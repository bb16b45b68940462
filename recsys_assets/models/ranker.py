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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from recsys_assets.models.calibration import log_loss, roc_auc
from recsys_assets.models.device import pick_device, seed_everything
from recsys_assets.pipeline.features import FEATURE_COLUMNS, FEATURE_SET_VERSION, HISTORY_SCORES
from recsys_assets.pipeline.runs import rank_within_runs, run_starts

_MIN_SCALE = 1e-6
PRECISIONS = ("fp32", "bf16")
"""Inference precisions of `RankerModel.predict_matrix`."""


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
        # A standardised input added to the logit with a weight chosen on validation
        # subjects (`choose_prior`); index -1 = none.
        self.register_buffer("prior_index", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("prior_weight", torch.tensor(0.0))
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

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (self.transform(features) - self.center) * self.inverse_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardised = self.standardise(features)
        logit = self.mlp(standardised).squeeze(-1)
        if int(self.prior_index) < 0:
            return logit
        return logit + self.prior_weight * standardised[:, int(self.prior_index)]

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
        return self.predict_matrix(self._matrix(features), batch_size=batch_size)

    def predict_matrix(
        self,
        matrix: np.ndarray,
        *,
        columns: tuple[str, ...] | None = None,
        feature_set_version: str | None = None,
        batch_size: int = 65_536,
        pad_last: bool = False,
        precision: str = "fp32",
    ) -> np.ndarray:
        """Raw probabilities (float32) for a float32 rows × features matrix, in batches on
        the model's device. `columns` names the matrix's columns when they are not in the
        ranker's own order; `feature_set_version` is checked against the ranker's.

        `pad_last` pads the last batch with zero rows, so every forward pass has the same
        shape (BLAS picks kernels by shape: a row's score then does not depend on its
        batch). `precision` is `fp32`, or `bf16`: the network's matmuls under autocast
        (`log1p` and the standardisation stay fp32), as `models.bundle` allows it.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision is {precision!r}; use one of {list(PRECISIONS)}")
        if feature_set_version is not None:
            self._check_version([feature_set_version])
        order: list[int] | None = None
        if columns is not None and tuple(columns) != self.feature_columns:
            missing = [name for name in self.feature_columns if name not in columns]
            if missing:
                raise ValueError(
                    f"feature matrix lacks {len(missing)} ranker input(s), e.g. {missing[:5]}"
                )
            position = {name: index for index, name in enumerate(columns)}
            order = [position[name] for name in self.feature_columns]
        out = np.empty(len(matrix), dtype=np.float32)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else nullcontext()
        )
        with torch.inference_mode(), autocast:
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    self._stream_pinned(matrix, order, out, batch_size, pad_last)
                return out
            for start in range(0, len(matrix), batch_size):
                block = matrix[start : start + batch_size]
                if order is not None:
                    block = block[:, order]
                block = np.asarray(block, dtype=np.float32)  # any layout: torch reads views
                rows = len(block)
                if pad_last and rows < batch_size:
                    padding = np.zeros((batch_size - rows, block.shape[1]), dtype=np.float32)
                    block = np.concatenate([block, padding])
                probabilities = torch.sigmoid(self.network(torch.from_numpy(block)))
                out[start : start + rows] = probabilities.float().numpy()[:rows]
        return out

    def _stream_pinned(
        self,
        matrix: np.ndarray,
        order: list[int] | None,
        out: np.ndarray,
        batch_size: int,
        pad_last: bool,
    ) -> None:
        """The CUDA batch loop: each batch is staged in one of two pinned host buffers and
        copied to the GPU with `non_blocking=True`; its probabilities come back once per
        batch into a pinned output buffer. While the GPU copies and scores batch i, the
        CPU stages batch i+1 in the other buffer; a buffer is reused only after the event
        recorded behind its last copy back has completed. One stream (the device's current
        one): a batch's copy in, kernels and copy back run in order, so no cross-stream
        synchronisation is needed; the price is that the GPU does not overlap one batch's
        copy with the previous batch's kernels."""
        width = len(self.feature_columns)
        staging = [
            torch.empty((batch_size, width), dtype=torch.float32, pin_memory=True) for _ in range(2)
        ]
        results = [torch.empty(batch_size, dtype=torch.float32, pin_memory=True) for _ in range(2)]
        copied_back = [torch.cuda.Event(), torch.cuda.Event()]
        in_flight: list[tuple[int, int] | None] = [None, None]

        def drain(slot: int) -> None:
            pending = in_flight[slot]
            if pending is not None:
                copied_back[slot].synchronize()
                start, rows = pending
                out[start : start + rows] = results[slot].numpy()[:rows]
                in_flight[slot] = None

        for index, start in enumerate(range(0, len(matrix), batch_size)):
            slot = index % 2
            drain(slot)
            block = matrix[start : start + batch_size]
            rows = len(block)
            size = batch_size if pad_last else rows
            host = staging[slot].numpy()
            host[:rows] = block if order is None else block[:, order]
            host[rows:size] = 0.0
            batch = staging[slot][:size].to(self.device, non_blocking=True)
            probabilities = torch.sigmoid(self.network(batch)).float()
            results[slot][:size].copy_(probabilities, non_blocking=True)
            copied_back[slot].record()
            in_flight[slot] = (start, rows)
        for slot in (0, 1):
            drain(slot)

    def _check_version(self, versions: list[str]) -> None:
        if versions != [self.feature_set_version]:
            raise ValueError(
                f"features have feature_set_version {versions} but the ranker was "
                f"trained on {self.feature_set_version!r}: rematerialize model_bundle"
            )

    def _matrix(self, features: pd.DataFrame) -> np.ndarray:
        missing = [name for name in self.feature_columns if name not in features.columns]
        if missing:
            raise ValueError(
                f"feature frame lacks {len(missing)} ranker input(s), e.g. {missing[:5]}; "
                "build it with recsys_assets.pipeline.features.compute_features"
            )
        if "feature_set_version" in features.columns and len(features):
            self._check_version(sorted(features["feature_set_version"].unique()))
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
    """The validation split's labels and raw predictions (for calibration), and its feature
    rows with their subjects (to measure how reduced-precision inference ranks them)."""

    labels: np.ndarray
    predictions: np.ndarray
    score_time: np.ndarray
    """The order the calibration report splits on (earlier half fits, later half reports)."""
    features: np.ndarray
    """Rows × the ranker's feature_columns, float32."""
    subjects: np.ndarray


@dataclass
class RankerResult:
    model: RankerModel
    metrics: dict[str, float]
    validation: ValidationScores = field(repr=False)


PRIOR_CANDIDATES = (*HISTORY_SCORES, "embedding_dot")
"""Single inputs that rank well on their own: the validation subjects pick the best one."""
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 1000.0)
"""Weights tried for the prior (1000: the prior decides, the network breaks its ties)."""


def within_subject_recall(
    scores: np.ndarray, labels: np.ndarray, subjects: np.ndarray, k: int
) -> float:
    """Mean over subjects with a positive row of (positives in their top k) / positives."""
    if len(scores) == 0:
        return float("nan")
    order = np.lexsort((-scores, subjects))
    ranked_subjects, ranked_labels = subjects[order], labels[order]
    starts = run_starts(ranked_subjects)
    in_top = rank_within_runs(ranked_subjects) < k
    hits = np.add.reduceat(ranked_labels * in_top, starts)
    positives = np.add.reduceat(ranked_labels, starts)
    judged = positives > 0
    return float(np.mean(hits[judged] / positives[judged])) if judged.any() else float("nan")


def choose_prior(
    network: _Network, rows: pd.DataFrame, labels: np.ndarray, k: int
) -> dict[str, float]:
    """Blend the network's logit with its strongest single input, as validation says.

    A ranker trained on few labels (sparse logs, small catalogs) can rank worse than the
    best source it is given. On the validation subjects this picks the input of
    PRIOR_CANDIDATES that ranks best alone, then the weight of PRIOR_WEIGHTS with which
    logit + weight × that standardised input ranks best (Recall@k within the pools; ties:
    the smaller weight), and stores both in the network. Weight 0 leaves the network alone.
    """
    columns = list(FEATURE_COLUMNS)
    matrix = torch.from_numpy(rows[columns].to_numpy(dtype=np.float32, copy=True))
    subjects = rows["subject_id"].to_numpy(dtype=np.int64)
    with torch.inference_mode():
        standardised = network.standardise(matrix.to(network.center.device)).cpu().numpy()
        logit = network.mlp(torch.from_numpy(standardised).to(network.center.device))
        logit = logit.squeeze(-1).cpu().numpy().astype(np.float64)
    alone = {
        name: within_subject_recall(standardised[:, columns.index(name)], labels, subjects, k)
        for name in PRIOR_CANDIDATES
        if name in columns
    }
    prior = max(alone, key=lambda name: (np.nan_to_num(alone[name], nan=-1.0), name))
    values = standardised[:, columns.index(prior)].astype(np.float64)
    recall = {
        weight: within_subject_recall(logit + weight * values, labels, subjects, k)
        for weight in PRIOR_WEIGHTS
    }
    weight = max(PRIOR_WEIGHTS, key=lambda w: (np.nan_to_num(recall[w], nan=-1.0), -w))
    if weight > 0:
        network.prior_index.fill_(columns.index(prior))
        network.prior_weight.fill_(weight)
    return {
        "validation_recall_network": recall[0.0],
        "validation_recall_prior_alone": alone[prior],
        "validation_recall": recall[weight],
        "prior_weight": weight,
        "prior_input": float(columns.index(prior)),
    }


def train_ranker(
    rows: pd.DataFrame,
    *,
    validation_fraction: float,
    k: int = 20,
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
    validation_rows = rows.loc[is_validation]
    blend = choose_prior(network, validation_rows, labels[is_validation], k)
    model = RankerModel(network, hidden_sizes=config.hidden_sizes, device=device)
    predictions = model.predict(validation_rows)
    validation_labels = labels[is_validation]
    metrics = {
        "auc": roc_auc(validation_labels, predictions),
        "log_loss": log_loss(validation_labels, predictions),
        "train_rows": float((~is_validation).sum()),
        "validation_rows": float(is_validation.sum()),
        "validation_positive_rate": float(validation_labels.mean()),
        **blend,
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
            features=matrix[is_validation],
            subjects=validation_rows["subject_id"].to_numpy(dtype=np.int64),
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
    # Weights averaged over the second half of training (stochastic weight averaging): the
    # last SGD iterate's ranking moved by ±3% Recall@20 with the epoch count on ml-100k.
    averaged = AveragedModel(network)
    network.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(features), generator=shuffle).to(device)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(network(features[batch]), targets[batch])
            loss.backward()
            optimiser.step()
            if epoch >= config.epochs // 2:
                averaged.update_parameters(network)
    network.load_state_dict(averaged.module.state_dict())
    return network.eval()
