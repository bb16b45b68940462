"""Experiments: a deterministic split of a surface's subjects between serving modes.

A subject's arm is a pure function of (experiment id, subject id): the first 8 bytes of
BLAKE2b over `"<experiment id>:<subject id>"`, read as a fraction of 2^64, fall into one
arm's share of [0, 1) (arms in configuration order, shares proportional to their weights).
So every serving process, `recsys evaluate` and any later analysis give the same subject
the same arm without sharing state, and a new experiment id reshuffles everyone
independently of the previous split. Only this module assigns arms.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from recsys_assets.config import Settings, SurfaceConfig
from recsys_assets.config.settings import ExperimentConfig

_SCALE = float(1 << 64)


@dataclass(frozen=True, slots=True)
class Assignment:
    """A subject's arm of a surface's experiment and the serving mode that arm uses."""

    experiment_id: str
    arm: str
    serving_mode: str

    def to_dict(self) -> dict[str, str]:
        """What a response shows: `{"id": ..., "arm": ...}`."""
        return {"id": self.experiment_id, "arm": self.arm}


class Experiment:
    """One configured experiment, ready to assign subjects (a bisect per call)."""

    __slots__ = ("_bounds", "_key", "arms", "experiment_id")

    def __init__(self, config: ExperimentConfig) -> None:
        self.experiment_id = config.id
        self.arms = tuple(
            Assignment(config.id, name, arm.serving_mode) for name, arm in config.arms.items()
        )
        weights = [arm.weight for arm in config.arms.values()]
        total = sum(weights)
        bounds = [bound / total for bound in accumulate(weights)]
        bounds[-1] = 1.0  # no subject may fall past the last arm through rounding
        self._bounds = tuple(bounds[:-1])
        self._key = f"{config.id}:".encode()

    def fraction(self, subject_id: int) -> float:
        """The subject's stable position in [0, 1) for this experiment."""
        digest = hashlib.blake2b(self._key + str(subject_id).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / _SCALE

    def assign(self, subject_id: int) -> Assignment:
        return self.arms[bisect_right(self._bounds, self.fraction(subject_id))]

    def split(self, subject_ids: Iterable[int]) -> dict[str, np.ndarray]:
        """Arm name → the given subject ids in that arm (every arm present, maybe empty)."""
        ids = np.asarray(list(subject_ids), dtype=np.int64)
        arms = np.array([self.assign(int(subject)).arm for subject in ids], dtype=object)
        return {arm.arm: ids[arms == arm.arm] for arm in self.arms}

    def modes(self) -> tuple[str, ...]:
        """The distinct serving modes of the arms, in arm order."""
        return tuple(dict.fromkeys(arm.serving_mode for arm in self.arms))


def experiment_of(surface: SurfaceConfig) -> Experiment | None:
    return Experiment(surface.experiment) if surface.experiment is not None else None


def experiments(settings: Settings) -> dict[str, Experiment]:
    """Surface → its experiment, for the surfaces that run one."""
    return {
        name: experiment
        for name, surface in settings.surfaces.items()
        if (experiment := experiment_of(surface)) is not None
    }
