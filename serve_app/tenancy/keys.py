"""Bearer-token checks, done before any request body is read or any engine work starts, and the
caller's rights: scopes and the models its key may use.

Tokens are held only as sha256 digests, compared in constant time against every configured key,
so neither the config nor a timing side channel reveals them.
"""

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime

from cluster.schema import ApiKey, AuthConfig, Scope
from serve_app.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Caller:
    """Who made a request: its key, or None where auth is off (and every right is granted)."""

    key: ApiKey | None

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key else None

    def require(self, scope: Scope) -> None:
        if self.key is not None and scope not in self.key.scopes:
            raise Forbidden(f"API key {self.key.name!r} lacks the {scope!r} scope this route needs")

    def may_use(self, names: tuple[str, ...]) -> bool:
        return self.key is None or self.key.may_use(names)


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self._keys = [(key, _digest_of(key)) for key in config.keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Caller:
        if not self.enabled:
            return Caller(key=None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send the header 'Authorization: Bearer <token>'")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for key, digest in self._keys:
            if hmac.compare_digest(presented, digest):
                found = key
        if found is None:
            raise Unauthorized("invalid bearer token")
        if found.expires_at is not None and datetime.now(UTC) >= found.expires_at:
            raise Unauthorized(f"API key {found.name!r} expired at {found.expires_at.isoformat()}")
        return Caller(key=found)


def _digest_of(key: ApiKey) -> bytes:
    """Environment variables are read on the node running the ingress, when it starts."""
    if key.sha256 is not None:
        return bytes.fromhex(key.sha256)
    token = os.environ.get(key.env or "", "").strip()
    if not token:
        raise RuntimeError(
            f"API key {key.name!r} reads its token from the environment variable {key.env}, "
            f"which is not set on this node"
        )
    return hashlib.sha256(token.encode()).digest()
