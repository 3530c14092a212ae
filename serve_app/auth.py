"""Bearer-token checks, done before any request body is read or any engine work starts.

Tokens are held only as sha256 digests, compared in constant time against every configured key,
so neither the config nor a timing side channel reveals them.
"""

import hashlib
import hmac
import os
from dataclasses import dataclass

from cluster.schema import AuthConfig
from serve_app.errors import Unauthorized


@dataclass(frozen=True)
class Caller:
    """Who made a request: the key's name, or None where auth is off."""

    key_name: str | None


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self._digests = [(key.name, _digest_of(key.name, key.sha256, key.env)) for key in config.keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def authenticate(self, authorization: str | None) -> Caller:
        if not self.enabled:
            return Caller(key_name=None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send the header 'Authorization: Bearer <token>'")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = name
        if found is None:
            raise Unauthorized("invalid bearer token")
        return Caller(key_name=found)


def _digest_of(name: str, sha256_hex: str | None, env: str | None) -> bytes:
    """Environment variables are read on the node running the ingress, when it starts."""
    if sha256_hex is not None:
        return bytes.fromhex(sha256_hex)
    token = os.environ.get(env or "", "").strip()
    if not token:
        raise RuntimeError(
            f"API key {name!r} reads its token from the environment variable {env}, "
            f"which is not set on this node"
        )
    return hashlib.sha256(token.encode()).digest()
