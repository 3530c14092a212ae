"""Bearer-token checks, done before any request body is read or any engine work starts, and the
caller's rights: scopes and the models its key may use.

Tokens are held only as sha256 digests. A presented token is hashed and its digest looked up:
what a lookup's timing could tell is about the digest, from which no token can be recovered. The
config's keys are fixed for the replica's life; keys made through the admin API (the runtime
keys) are replaced whole whenever the key registry publishes a change.
"""

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cluster.schema import ApiKey, AuthConfig, Scope, Tenant
from serve_app.errors import Forbidden, Unauthorized
from serve_app.tenancy.budgets import Subject
from serve_app.tenancy.key_store import KeySnapshot, StoredKey, StoredTenant

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Caller:
    """Who made a request: its key and the key's tenant, or None where auth is off (the chat and
    info routes are then open to all, and the admin routes to none)."""

    key: ApiKey | None
    tenant: Tenant | None = None

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key else None

    @property
    def tenant_name(self) -> str | None:
        return self.tenant.name if self.tenant else None

    def subjects(self) -> list[Subject]:
        """What its requests count toward: its key's limits, then its tenant's."""
        subjects = [] if self.key is None else [Subject.key(self.key.name, self.key.limits)]
        if self.tenant is not None:
            subjects.append(Subject.tenant(self.tenant.name, self.tenant.limits))
        return subjects

    def require(self, scope: Scope) -> None:
        if self.key is None:
            if scope == "admin":
                raise Forbidden("the admin routes need an API key with the admin scope; this config has no keys")
            return
        if scope not in self.key.scopes:
            raise Forbidden(f"API key {self.key.name!r} lacks the {scope!r} scope this route needs")

    def may_use(self, names: tuple[str, ...]) -> bool:
        return self.key is None or self.key.may_use(names)


@dataclass(frozen=True)
class _Entry:
    key: ApiKey
    tenant: Tenant | None = None
    disabled: str | None = None
    """Why the key is suspended (itself, or its tenant), if it is."""
    valid_until: float | None = None
    """For a rotated key's old secret: the end of its grace period."""


class KeyRing:
    def __init__(self, config: AuthConfig) -> None:
        self._config_tenants = {tenant.name: tenant for tenant in config.tenants}
        self._config_keys: dict[bytes, _Entry] = {}
        for key in config.keys:
            digest = _digest_of(key)
            if digest in self._config_keys:
                raise RuntimeError(f"API keys {self._config_keys[digest].key.name!r} and {key.name!r} have one token")
            self._config_keys[digest] = _Entry(key, self._config_tenants.get(key.tenant or ""))
        self._runtime_keys: dict[bytes, _Entry] = {}
        self.revision = -1
        """The key registry's revision the runtime keys are of (-1: none yet)."""

    @property
    def enabled(self) -> bool:
        """Runtime keys are made by admin keys, which the config holds: no config keys, no auth."""
        return bool(self._config_keys)

    def replace_runtime(self, snapshot: KeySnapshot) -> None:
        tenants = dict(self._config_tenants)
        suspended = set()
        for stored_tenant in snapshot.tenants:
            try:
                tenants[stored_tenant.name] = as_tenant(stored_tenant)
            except ValueError:
                logger.exception("runtime tenant %r cannot be read; its keys are refused", stored_tenant.name)
                continue
            if stored_tenant.disabled:
                suspended.add(stored_tenant.name)
        keys: dict[bytes, _Entry] = {}
        for stored in snapshot.keys:
            try:
                key = as_api_key(stored)
            except ValueError:
                # A row this version cannot read must not stop every other key from applying.
                logger.exception("runtime API key %r cannot be read; it is refused", stored.name)
                continue
            tenant = tenants.get(stored.tenant) if stored.tenant is not None else None
            if stored.tenant is not None and tenant is None:
                logger.error(
                    "runtime API key %r belongs to the unknown tenant %r; it is refused", key.name, stored.tenant
                )
                continue
            disabled = "is suspended" if stored.disabled else None
            if stored.tenant in suspended:
                disabled = f"is suspended, as its tenant {stored.tenant!r} is"
            for digest, valid_until in ((stored.digest, None), (stored.previous_digest, stored.previous_valid_until)):
                if digest is None:
                    continue
                raw = bytes.fromhex(digest)
                if raw in self._config_keys:
                    logger.error("runtime API key %r has the token of a config key; it is ignored", stored.name)
                    continue
                keys[raw] = _Entry(key, tenant, disabled, valid_until)
        self._runtime_keys = keys
        self.revision = snapshot.revision

    def authenticate(self, authorization: str | None) -> Caller:
        if not self.enabled:
            return Caller(key=None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send the header 'Authorization: Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode()).digest()
        entry = self._config_keys.get(digest) or self._runtime_keys.get(digest)
        if entry is None or (entry.valid_until is not None and time.time() >= entry.valid_until):
            raise Unauthorized("invalid bearer token")
        key = entry.key
        if entry.disabled is not None:
            raise Unauthorized(f"API key {key.name!r} {entry.disabled}")
        if key.expires_at is not None and datetime.now(UTC) >= key.expires_at:
            raise Unauthorized(f"API key {key.name!r} expired at {key.expires_at.isoformat()}")
        return Caller(key=key, tenant=entry.tenant)


def as_api_key(stored: StoredKey) -> ApiKey:
    expires_at = None if stored.expires_at is None else datetime.fromtimestamp(stored.expires_at, UTC)
    return ApiKey(
        name=stored.name,
        sha256=stored.digest,
        models=stored.models,
        scopes=stored.scopes,
        limits=stored.limits,
        expires_at=expires_at,
        tenant=stored.tenant,
    )


def as_tenant(stored: StoredTenant) -> Tenant:
    return Tenant(name=stored.name, limits=stored.limits)


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
