"""Fill: walk a checked list in order, skip the rejected, stop at the number wanted.

Several lists feed one response (the subject's list, then fallback lists for the top-up);
`Fill` carries what is taken so far across them, so no item appears twice and positions
stay dense. Item dicts are built straight from the version's arrays: no pandas here.

Each item carries its numbers on their own scales, never mixed in one field: `score` is the
ranker's calibrated probability (null where no model scored the item: fallback lists, or a
version published before the probability was stored), `utility` what the slate was ranked
by (it can exceed 1), `fallback_score` a fallback list's own ranking value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypedDict

import numpy as np

from recsys_assets.rules.eligibility import REASON_BY_CODE
from recsys_assets.serving.store import PublishedVersion

_REASON_COUNT = len(REASON_BY_CODE)


class RecommendedItem(TypedDict):
    item_id: int
    position: int
    score: float | None
    utility: float | None
    fallback_score: float | None
    reason_codes: tuple[str, ...]
    source_provenance: tuple[str, ...]


class Fill:
    """Items chosen for one response, and every rejection met on the way, by reason code."""

    __slots__ = ("checked", "items", "rejections", "taken", "want")

    def __init__(self, want: int) -> None:
        self.want = want
        self.items: list[RecommendedItem] = []
        self.taken: set[int] = set()
        self.rejections: dict[int, int] = {}
        self.checked = 0

    @property
    def full(self) -> bool:
        return len(self.items) >= self.want

    def take(
        self,
        version: PublishedVersion,
        list_index: int,
        check: Callable[[np.ndarray, np.ndarray], np.ndarray],
        positions: np.ndarray,
        *,
        slate_only: bool = False,
    ) -> int:
        """Check list `list_index` of `version` in one batch and take what passes; returns
        how many items it contributed. Every item is checked, so each rejection is counted.

        `positions` are the version's rows mapped to catalog positions (one array per
        version and catalog, so no per-request lookup of item ids). `slate_only` reads
        only the list's stored slate (`PublishedVersion.slate_stops`): a candidate-pool
        shortlist's deeper candidates never went through the batch slate policy.
        """
        start = int(version.starts[list_index])
        end = int((version.slate_stops if slate_only else version.starts[1:])[list_index])
        item_ids = version.item_ids[start:end]
        codes = check(item_ids, positions[start:end])
        self.checked += end - start
        counts = np.bincount(codes, minlength=_REASON_COUNT)
        if counts[0] != end - start:
            rejections = self.rejections
            for code in np.flatnonzero(counts[1:]).tolist():
                rejections[code + 1] = rejections.get(code + 1, 0) + int(counts[code + 1])
        items = self.items
        taken = self.taken
        added = 0
        valid = np.flatnonzero(codes == 0).tolist()
        if not valid:
            return 0
        ids = item_ids.tolist()
        stored = version.scores[start:end].tolist()
        calibrated = version.calibrated[start:end].tolist()
        fallback = version.fallback
        reasons = version.reason_codes[start:end].tolist()
        provenance = version.provenance_codes[start:end].tolist()
        reason_values = version.reason_values
        provenance_values = version.provenance_values
        for offset in valid:
            if len(items) >= self.want:
                break
            item_id = ids[offset]
            if item_id in taken:
                continue
            taken.add(item_id)
            value = stored[offset]
            probability = calibrated[offset]
            items.append(
                {
                    "item_id": item_id,
                    "position": len(items) + 1,
                    "score": None if fallback or math.isnan(probability) else probability,
                    "utility": None if fallback else value,
                    "fallback_score": value if fallback else None,
                    "reason_codes": reason_values[reasons[offset]],
                    "source_provenance": provenance_values[provenance[offset]],
                }
            )
            added += 1
        return added

    def count_checked(self, codes: np.ndarray) -> None:
        """Count one batch of final-check reason codes (0 = passed) checked outside `take`
        (candidates an online rerank orders itself)."""
        self.checked += len(codes)
        counts = np.bincount(codes, minlength=_REASON_COUNT)
        for code in np.flatnonzero(counts[1:]).tolist():
            self.rejections[code + 1] = self.rejections.get(code + 1, 0) + int(counts[code + 1])

    def add(
        self,
        item_id: int,
        *,
        score: float | None,
        utility: float | None,
        reason_codes: tuple[str, ...],
        source_provenance: tuple[str, ...],
    ) -> bool:
        """Append one checked item at the next position, unless full or already taken."""
        if len(self.items) >= self.want or item_id in self.taken:
            return False
        self.taken.add(item_id)
        self.items.append(
            {
                "item_id": item_id,
                "position": len(self.items) + 1,
                "score": score,
                "utility": utility,
                "fallback_score": None,
                "reason_codes": reason_codes,
                "source_provenance": source_provenance,
            }
        )
        return True

    def reject_all(
        self, version: PublishedVersion, list_index: int, code: int, *, slate_only: bool = False
    ) -> None:
        """Count a whole list (or its stored slate) as rejected for one reason (consent
        revoked: none may be used)."""
        stop = (version.slate_stops if slate_only else version.starts[1:])[list_index]
        size = int(stop - version.starts[list_index])
        self.rejections[code] = self.rejections.get(code, 0) + size
        self.checked += size

    def rejections_by_reason(self) -> dict[str, int]:
        return {str(REASON_BY_CODE[code]): count for code, count in self.rejections.items()}
