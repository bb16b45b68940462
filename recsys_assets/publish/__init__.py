"""Publish: versioned lists, the validation gate, the manifest flip, rollback, fallback lists.

Plain functions only (no Dagster import), so serving, the CLI and tests use them cheaply;
the Dagster assets and the rollback job live in `recsys_assets.publish.assets`.
"""

from recsys_assets.publish.fallback import compute_fallback_lists
from recsys_assets.publish.lists import (
    candidate_counts,
    decision_log,
    lists_from_slates,
    tracking_token,
)
from recsys_assets.publish.manifest import (
    ACTIVE,
    INVALID,
    PREVIOUS,
    ROLLED_BACK,
    HistoryEntry,
    Manifest,
    RollbackRefused,
    active_lists,
    collect_garbage,
    mark_invalid,
    read_manifest,
    rollback,
)
from recsys_assets.publish.publisher import PublishOutcome, publish_version
from recsys_assets.publish.validation import GateLimits, ValidationReport, validate_lists

__all__ = [
    "ACTIVE",
    "INVALID",
    "PREVIOUS",
    "ROLLED_BACK",
    "GateLimits",
    "HistoryEntry",
    "Manifest",
    "PublishOutcome",
    "RollbackRefused",
    "ValidationReport",
    "active_lists",
    "candidate_counts",
    "collect_garbage",
    "compute_fallback_lists",
    "decision_log",
    "lists_from_slates",
    "mark_invalid",
    "publish_version",
    "read_manifest",
    "rollback",
    "tracking_token",
    "validate_lists",
]
