"""Kill switch: take a surface, a surface in one region, or a campaign off the air at once.

Kills live in one JSON document in the warehouse, `serving/kills.json`, written like a
manifest: atomically, and conditionally on the version read (S3 `If-Match`, a local file
lock), so two operators killing at once both land. Every serving process re-reads it when
it changed (an ETag / stat check) on every manifest poll, and the process that takes a
kill applies it in memory at once: the next request there honours it, every other process
within the manifest poll interval (`serving.manifest_poll_interval_s`). No republish.

Scopes, each within one surface: the whole surface (every region) or one region of it →
requests are answered from the fallback lists (`served_from: "killed_fallback"`); a
campaign (optionally in one region) → its items are removed by the final check (rejection
reason `campaign_killed`) and the fill takes the next ones.

A damaged or unreadable document never lifts a kill: a process keeps enforcing the kills it
last read and reports the problem (`problem`, `/healthz`); changing kills is refused
(`KillsUnavailable`, HTTP 503) until the file is restored. A process that never read the
document successfully knows no kills and says so: not ready (`ever_read` is False).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from recsys_assets.config import Settings
from recsys_assets.data.snapshot import read_raw
from recsys_assets.warehouse import PreconditionFailed, Warehouse, WarehouseError

log = logging.getLogger(__name__)

KILLS_PATH = "serving/kills.json"
_WRITE_ATTEMPTS = 10
_MAX_TEXT = 500
_MAX_CAMPAIGN = 200
_CAMPAIGNS_NAMED = 20
# Control, format (bidi overrides, zero-width), surrogate, private-use and unassigned
# characters, and the Unicode line / paragraph separators: none belongs in one audit line.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_KILL_FIELDS = frozenset({"surface", "region", "campaign", "reason", "actor", "killed_at"})
_OPTIONAL_FIELDS = frozenset({"region", "campaign"})


class KillError(ValueError):
    """A kill or lift that cannot be done as asked; `status_code` is its HTTP status."""

    status_code = 422


class NoSuchKill(KillError):
    status_code = 404


class KillsUnavailable(KillError):
    """The kills document cannot be read (damaged or storage down): nothing can be changed
    safely until it is restored. 503: the request is fine, the service cannot do it now."""

    status_code = 503


@dataclass(frozen=True, slots=True)
class KillScope:
    """What a kill covers: a surface, optionally one region, optionally one campaign."""

    surface: str
    region: str | None = None
    campaign: str | None = None

    def describe(self) -> str:
        parts = [f"surface={self.surface}"]
        if self.region is not None:
            parts.append(f"region={self.region}")
        if self.campaign is not None:
            parts.append(f"campaign={self.campaign}")
        return " ".join(parts)

    def check(self, settings: Settings) -> KillScope:
        """This scope if it names a configured surface and region; raises KillError."""
        if self.surface not in settings.surfaces:
            raise KillError(
                f"surface: unknown surface {self.surface!r}; configured surfaces: "
                f"{sorted(settings.surfaces)}"
            )
        regions = settings.surface_regions(self.surface)
        if self.region is not None and self.region not in regions:
            raise KillError(
                f"region: surface {self.surface!r} is not configured for region "
                f"{self.region!r}; its regions: {list(regions)}"
            )
        if self.campaign is not None:
            if not 0 < len(self.campaign.strip()) <= _MAX_CAMPAIGN:
                raise KillError(f"campaign: give the campaign_id (1 to {_MAX_CAMPAIGN} characters)")
            check_printable("campaign", self.campaign)
        return self


@dataclass(frozen=True, slots=True)
class Kill:
    """One active kill and its audit trail: who, why and when."""

    surface: str
    region: str | None
    campaign: str | None
    reason: str
    actor: str
    killed_at: str

    @property
    def scope(self) -> KillScope:
        return KillScope(self.surface, self.region, self.campaign)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActiveKills:
    """The kills in force, indexed for the request path (immutable; swapped whole)."""

    __slots__ = ("_campaigns", "_partitions", "kills")

    def __init__(self, kills: tuple[Kill, ...] = ()) -> None:
        self.kills = kills
        self._partitions: dict[tuple[str, str | None], Kill] = {}
        campaigns: dict[tuple[str, str | None], set[str]] = {}
        for kill in kills:
            if kill.campaign is None:
                self._partitions[(kill.surface, kill.region)] = kill
            else:
                campaigns.setdefault((kill.surface, kill.region), set()).add(kill.campaign)
        self._campaigns = {key: frozenset(names) for key, names in campaigns.items()}

    def __bool__(self) -> bool:
        return bool(self.kills)

    def partition_kill(self, surface: str, region: str) -> Kill | None:
        """The kill that takes (surface, region) off its lists, if any."""
        found = self._partitions.get((surface, None))
        return found if found is not None else self._partitions.get((surface, region))

    def killed_campaigns(self, surface: str, region: str) -> frozenset[str]:
        surface_wide = self._campaigns.get((surface, None), frozenset())
        return surface_wide | self._campaigns.get((surface, region), frozenset())


class KillSwitch:
    """Reads, applies and changes the kills of one warehouse."""

    def __init__(
        self, warehouse: Warehouse, settings: Settings, *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.warehouse = warehouse
        self.settings = settings
        self.clock = clock
        self.active = ActiveKills()
        """The kills in force: what the request path reads (no I/O there)."""
        self.problem: str | None = None
        """Why the document could not be read on the last refresh (None when it could)."""
        self.ever_read = False
        """Whether the document was read successfully once: until then no kill is known."""
        self._etag: str | None = None
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the kills if the document changed; True when the kills did. A read error
        keeps the kills known so far and is kept in `problem` (logged when it changes): a
        damaged file or a storage hiccup must not lift a kill."""
        with self._lock:
            try:
                if self._current():
                    return False
                kills, etag = self._read()
            except KillsUnavailable as error:
                if str(error) != self.problem:
                    log.error("kill switch: %s", error)
                self.problem = str(error)
                return False
            if self.problem is not None:
                log.warning("kill switch: %s is readable again", KILLS_PATH)
            changed = not self.ever_read or kills != self.active.kills
            self.active, self._etag = ActiveKills(kills), etag
            self.problem, self.ever_read = None, True
            return changed

    def _current(self) -> bool:
        """Whether the kills in force are those of the document now (an ETag check)."""
        if not self.ever_read or self.problem is not None:
            return False
        try:
            return self.warehouse.etag(KILLS_PATH) == self._etag
        except (OSError, WarehouseError) as error:
            uri = self.warehouse.uri(KILLS_PATH)
            raise KillsUnavailable(f"{uri} cannot be read ({error}); retry later") from None

    def read(self) -> tuple[Kill, ...]:
        """The kills in the document now; raises KillsUnavailable naming the file and the
        problem when it cannot be read."""
        return self._read()[0]

    def _read(self) -> tuple[tuple[Kill, ...], str | None]:
        uri = self.warehouse.uri(KILLS_PATH)
        try:
            etag = self.warehouse.etag(KILLS_PATH)
            if etag is None:
                return (), None
            document = self.warehouse.read_json(KILLS_PATH)
        except FileNotFoundError:
            return (), None
        except json.JSONDecodeError as error:
            raise KillsUnavailable(f"{uri} is malformed: not JSON ({error}); {_RESTORE}") from None
        except (OSError, WarehouseError) as error:
            raise KillsUnavailable(f"{uri} cannot be read ({error}); retry later") from None
        try:
            kills = _parse(document)
        except ValueError as error:
            raise KillsUnavailable(f"{uri} is malformed: {error}; {_RESTORE}") from None
        return kills, etag

    # -- changing --------------------------------------------------------------------------

    def kill(
        self, scope: KillScope, *, reason: str, actor: str, allow_unknown_campaign: bool = False
    ) -> Kill:
        """Put `scope` under a kill (replacing an earlier kill of the same scope). A campaign
        no catalog item carries is refused unless `allow_unknown_campaign` (a pre-emptive
        kill of a campaign not launched yet)."""
        scope.check(self.settings)
        reason = _text("reason", reason)
        actor = _text("actor", actor)
        if scope.campaign is not None and not allow_unknown_campaign:
            self._check_campaign_known(scope)
        killed_at = datetime.fromtimestamp(self.clock() / 1e9, UTC).isoformat()
        kill = Kill(scope.surface, scope.region, scope.campaign, reason, actor, killed_at)
        self._update(lambda kills: (*[k for k in kills if k.scope != scope], kill))
        return kill

    def _check_campaign_known(self, scope: KillScope) -> None:
        try:
            known = raw_campaigns(self.warehouse)
        except (OSError, WarehouseError) as error:
            raise KillError(
                f"campaign: cannot check campaign {scope.campaign!r} against the raw items "
                f"({error}); to kill it anyway, {_ALLOW_UNKNOWN}"
            ) from None
        if scope.campaign not in known:
            named = ", ".join(sorted(known)[:_CAMPAIGNS_NAMED]) or "none"
            more = (
                f" and {len(known) - _CAMPAIGNS_NAMED} more"
                if len(known) > _CAMPAIGNS_NAMED
                else ""
            )
            raise KillError(
                f"campaign: no catalog item carries campaign_id {scope.campaign!r} (known "
                f"campaigns: {named}{more}); to kill it before it launches, {_ALLOW_UNKNOWN}"
            )

    def lift(self, scope: KillScope, *, actor: str, reason: str | None = None) -> Kill:
        """Remove the kill of exactly `scope`; returns it. Raises NoSuchKill without one.
        `actor` and `reason` go into the audit trail: checked like a kill's."""
        scope.check(self.settings)
        _text("actor", actor)
        if reason is not None:
            _text("reason", reason)
        lifted: list[Kill] = []

        def without(kills: tuple[Kill, ...]) -> tuple[Kill, ...]:
            lifted[:] = [k for k in kills if k.scope == scope]
            if not lifted:
                active = ", ".join(k.scope.describe() for k in kills) or "none"
                raise NoSuchKill(f"no kill of {scope.describe()} is active (active: {active})")
            return tuple(k for k in kills if k.scope != scope)

        self._update(without)
        return lifted[0]

    def _update(self, change: Callable[[tuple[Kill, ...]], tuple[Kill, ...]]) -> None:
        """Read, change and conditionally write the document; retried when another writer
        got in between, so no concurrent kill or lift is lost."""
        for _ in range(_WRITE_ATTEMPTS):
            kills, etag = self._read()  # KillsUnavailable: nothing is changed on a bad file
            changed = change(kills)
            document = {"kills": [kill.to_dict() for kill in changed]}
            data = json.dumps(document, indent=2, sort_keys=True).encode()
            try:
                self.warehouse.write_bytes_if(KILLS_PATH, data, expected_etag=etag)
            except PreconditionFailed:
                continue
            except (OSError, WarehouseError) as error:
                raise KillsUnavailable(
                    f"{self.warehouse.uri(KILLS_PATH)} cannot be written ({error}); retry later"
                ) from None
            with self._lock:
                self.active, self.problem, self.ever_read = ActiveKills(changed), None, True
                self._etag = None  # the next poll re-reads: another write may follow ours
            return
        raise KillsUnavailable(
            f"{self.warehouse.uri(KILLS_PATH)} kept changing under {_WRITE_ATTEMPTS} attempts; "
            "retry"
        )


_ALLOW_UNKNOWN = (
    'pass --allow-unknown-campaign (recsys kill) or "allow_unknown_campaign": true (HTTP)'
)
_RESTORE = (
    "serving keeps enforcing the kills it last read; restore the file (a JSON object "
    'like {"kills": [{"surface": ..., "region": null, "campaign": null, "reason": ..., '
    '"actor": ..., "killed_at": ...}]}) before changing kills'
)


def raw_campaigns(warehouse: Warehouse) -> frozenset[str]:
    """The campaign_ids the raw items carry (what the serving catalog matches kills on)."""
    campaigns = read_raw(warehouse, "items", columns=["campaign_id"])["campaign_id"]
    return frozenset(str(campaign) for campaign in campaigns.dropna().unique())


def check_printable(field: str, value: str) -> None:
    """Refuse control characters (newline, NUL, ESC, bidi overrides...) in text that goes
    into logs and the audit trail: one kill must be one log line, never a forged one."""
    for position, character in enumerate(value):
        if unicodedata.category(character) in _FORBIDDEN_CATEGORIES:
            raise KillError(
                f"{field}: control character U+{ord(character):04X} at position {position} "
                "is not allowed (one line of printable text)"
            )


def _text(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KillError(f"{field}: required, say why (it goes into the audit trail)")
    if len(value) > _MAX_TEXT:
        raise KillError(f"{field}: at most {_MAX_TEXT} characters, got {len(value)}")
    check_printable(field, value)
    return value.strip()


def _parse(document: Any) -> tuple[Kill, ...]:
    """The kills of a document; ValueError naming the entry and the key that is wrong."""
    if not isinstance(document, dict) or set(document) != {"kills"}:
        raise ValueError("expected a JSON object with exactly one key, 'kills'")
    entries = document["kills"]
    if not isinstance(entries, list):
        raise ValueError("'kills' must be a list")
    kills = []
    for index, entry in enumerate(entries):
        where = f"kills[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object")
        if unknown := sorted(set(entry) - _KILL_FIELDS):
            raise ValueError(f"{where} has unknown key(s) {unknown}")
        if missing := sorted(_KILL_FIELDS - set(entry)):
            raise ValueError(f"{where} lacks key(s) {missing}")
        for key, value in entry.items():
            if not (isinstance(value, str) or (value is None and key in _OPTIONAL_FIELDS)):
                raise ValueError(f"{where}.{key} must be a string, got {value!r}")
        kills.append(Kill(**entry))
    return tuple(kills)
