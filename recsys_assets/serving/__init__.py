"""Serving: store, final check, fill, fallback, HTTP API, metrics, decision log.

Reads only what publish wrote (manifests and versions) plus the online state; never
trusts a list blindly. `RecommendationService` is the Python API.
"""

from recsys_assets.serving.service import (
    EMPTY,
    FALLBACK,
    PRECOMPUTED,
    PRECOMPUTED_STALE,
    InvalidLimit,
    InvalidSubject,
    Recommendation,
    RecommendationService,
    ServingRequestError,
    UnknownRegion,
    UnknownSurface,
)
from recsys_assets.serving.state import InvalidEvent, ServingEvent

__all__ = [
    "EMPTY",
    "FALLBACK",
    "PRECOMPUTED",
    "PRECOMPUTED_STALE",
    "InvalidEvent",
    "InvalidLimit",
    "InvalidSubject",
    "Recommendation",
    "RecommendationService",
    "ServingEvent",
    "ServingRequestError",
    "UnknownRegion",
    "UnknownSurface",
]
