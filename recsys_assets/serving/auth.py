"""Bearer-token authorization of the HTTP API, configured by `RECSYS_API_TOKENS`.

`RECSYS_API_TOKENS="TOKEN:SCOPE[+SCOPE],..."`, scopes `events:write`,
`recommendations:read` and `admin` (which includes the other two). Without the variable
(the development default) every write is refused and reads stay open; with it, reads need
`recommendations:read` too. Tokens are compared as SHA-256 digests with
`hmac.compare_digest` against every configured token, so neither the match position nor
a token's length shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

TOKENS_ENV_VAR = "RECSYS_API_TOKENS"
EVENTS_WRITE = "events:write"
RECOMMENDATIONS_READ = "recommendations:read"
ADMIN = "admin"
SCOPES = (EVENTS_WRITE, RECOMMENDATIONS_READ, ADMIN)


class TokenConfigError(ValueError):
    """RECSYS_API_TOKENS is malformed; the message names the bad entry."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class ApiTokens:
    """The configured tokens (as digests) and their scopes; `None` means not configured."""

    grants: tuple[tuple[bytes, frozenset[str]], ...] | None

    @property
    def configured(self) -> bool:
        return self.grants is not None

    @classmethod
    def unconfigured(cls) -> ApiTokens:
        return cls(None)

    @classmethod
    def parse(cls, text: str) -> ApiTokens:
        """Tokens from `TOKEN:SCOPE[+SCOPE],...`; raises TokenConfigError naming a bad entry."""
        if not text.strip():
            raise TokenConfigError(
                f"{TOKENS_ENV_VAR} is set but empty: give TOKEN:SCOPE[+SCOPE] entries, or "
                "unset it for the development default (writes refused, reads open)"
            )
        grants: list[tuple[bytes, frozenset[str]]] = []
        seen: set[bytes] = set()
        for number, raw in enumerate(text.split(","), start=1):
            entry = raw.strip()
            token, colon, scope_text = entry.partition(":")
            token = token.strip()
            where = f"{TOKENS_ENV_VAR} entry {number}"
            if not colon or not token:
                raise TokenConfigError(
                    f"{where} is not TOKEN:SCOPE[+SCOPE] (got {_masked(entry)!r})"
                )
            if any(ch.isspace() for ch in token):
                raise TokenConfigError(f"{where}: the token contains whitespace")
            scopes = [scope.strip() for scope in scope_text.split("+")]
            unknown = [scope for scope in scopes if scope not in SCOPES]
            if unknown:
                raise TokenConfigError(
                    f"{where} ({_masked(entry)!r}): unknown scope(s) {unknown}; "
                    f"scopes are {list(SCOPES)}"
                )
            digest = _digest(token)
            if digest in seen:
                raise TokenConfigError(f"{where}: the token is listed twice")
            seen.add(digest)
            grants.append((digest, frozenset(scopes)))
        return cls(tuple(grants))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiTokens:
        environ = os.environ if environ is None else environ
        text = environ.get(TOKENS_ENV_VAR)
        return cls.unconfigured() if text is None else cls.parse(text)

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None for an unknown token (checks every entry)."""
        if not self.grants:
            return None
        presented = _digest(token)
        found: frozenset[str] | None = None
        for digest, scopes in self.grants:
            if hmac.compare_digest(presented, digest):
                found = scopes
        return found


def allows(scopes: frozenset[str], scope: str) -> bool:
    """Whether a token with `scopes` may act under `scope` (`admin` may do anything)."""
    return scope in scopes or ADMIN in scopes


def _masked(entry: str) -> str:
    """An entry for an error message, the token hidden: secrets stay out of logs."""
    token, colon, scopes = entry.partition(":")
    return f"***{colon}{scopes}" if token else entry
