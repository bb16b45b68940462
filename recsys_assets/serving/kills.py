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
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from recsys_assets.config import Settings
from recsys_assets.warehouse import PreconditionFailed, Warehouse, WarehouseError

log = logging.getLogger(__name__)

KILLS_PATH = "serving/kills.json"
_WRITE_ATTEMPTS = 10
_MAX_TEXT = 500


class KillError(ValueError):
    """A kill or lift that cannot be done as asked; `status_code` is its HTTP status."""

    status_code = 422


class NoSuchKill(KillError):
    status_code = 404


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
        if self.region is not None and self.region not in settings.regions:
            raise KillError(
                f"region: unknown region {self.region!r}; configured regions: "
                f"{list(settings.regions)}"
            )
        if self.campaign is not None and not 0 < len(self.campaign.strip()) <= 200:
            raise KillError("campaign: give the campaign_id (1 to 200 characters)")
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
        self._etag: str | None = None
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read the kills if the document changed; True when it did. A read error keeps
        the kills known so far (logged): a storage hiccup must not lift a kill."""
        with self._lock:
            try:
                etag = self.warehouse.etag(KILLS_PATH)
                if etag == self._etag:
                    return False
                kills, etag = self._read()
            except (OSError, WarehouseError, ValueError) as error:
                log.warning("kill switch: cannot read %s: %s", KILLS_PATH, error)
                return False
            self.active, self._etag = ActiveKills(kills), etag
            return True

    def _read(self) -> tuple[tuple[Kill, ...], str | None]:
        etag = self.warehouse.etag(KILLS_PATH)
        if etag is None:
            return (), None
        try:
            document = self.warehouse.read_json(KILLS_PATH)
            kills = tuple(Kill(**entry) for entry in document["kills"])
        except FileNotFoundError:
            return (), None
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{self.warehouse.uri(KILLS_PATH)} is malformed ({error}): serving keeps the "
                "kills it knew; restore the file (a JSON object with a 'kills' list) before "
                "changing kills"
            ) from None
        return kills, etag

    # -- changing --------------------------------------------------------------------------

    def kill(self, scope: KillScope, *, reason: str, actor: str) -> Kill:
        """Put `scope` under a kill (replacing an earlier kill of the same scope)."""
        scope.check(self.settings)
        reason = _text("reason", reason)
        killed_at = datetime.fromtimestamp(self.clock() / 1e9, UTC).isoformat()
        kill = Kill(scope.surface, scope.region, scope.campaign, reason, actor, killed_at)
        self._update(lambda kills: (*[k for k in kills if k.scope != scope], kill))
        return kill

    def lift(self, scope: KillScope) -> Kill:
        """Remove the kill of exactly `scope`; returns it. Raises NoSuchKill without one."""
        scope.check(self.settings)
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
            kills, etag = self._read()
            changed = change(kills)
            document = {"kills": [kill.to_dict() for kill in changed]}
            data = json.dumps(document, indent=2, sort_keys=True).encode()
            try:
                self.warehouse.write_bytes_if(KILLS_PATH, data, expected_etag=etag)
            except PreconditionFailed:
                continue
            with self._lock:
                self.active = ActiveKills(changed)
                self._etag = None  # the next poll re-reads: another write may follow ours
            return
        raise WarehouseError(
            f"{self.warehouse.uri(KILLS_PATH)} kept changing under {_WRITE_ATTEMPTS} attempts; "
            "retry"
        )


def _text(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KillError(f"{field}: required, say why (it goes into the audit trail)")
    if len(value) > _MAX_TEXT:
        raise KillError(f"{field}: at most {_MAX_TEXT} characters, got {len(value)}")
    return value.strip()
