"""The admin routes that manage API keys at runtime (`/admin/keys`): JSON in and out, errors in
OpenAI's shape, for keys with the `admin` scope. A key's secret is made here, returned once (as
`"key"`) and never stored or shown again: the registry keeps its sha256 digest only. The config's
keys are listed too, and cannot be changed here. A key may belong to a tenant (`/admin/tenants`)."""

from datetime import datetime
from fnmatch import fnmatchcase
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cluster.keys import new_token, token_digest
from cluster.schema import ApiKey, KeyLimits, Scope
from cluster.schema.tenancy import NAME
from serve_app.apis.admin import iso
from serve_app.apis.admin_registry import Body, RegistryCalls, changes_of, parsed, refuse_unpriced_spend
from serve_app.errors import BadRequest, Conflict, NotFound
from serve_app.tenancy.budgets import Subject
from serve_app.tenancy.key_store import KeySnapshot, StoredKey
from serve_app.tenancy.keys import Caller, as_api_key
from serve_app.tenancy.limiter import LimitGate

MAX_GRACE_S = 30 * 24 * 3600


class KeyCreate(Body):
    name: str = Field(pattern=NAME)
    tenant: str | None = Field(default=None, pattern=NAME)
    models: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["*"])
    scopes: list[Scope] = Field(default_factory=lambda: ["chat"], min_length=1)
    expires_at: datetime | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)
    metadata: dict[str, str] = Field(default_factory=dict)


class KeyUpdate(Body):
    """Only the fields given change; `disabled: true` suspends the key, `false` restores it;
    `tenant: null` takes it out of its tenant."""

    tenant: str | None = Field(default=None, pattern=NAME)
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    scopes: list[Scope] | None = Field(default=None, min_length=1)
    expires_at: datetime | None = None
    limits: KeyLimits | None = None
    metadata: dict[str, str] | None = None
    disabled: bool | None = None


class KeyRotate(Body):
    grace_s: float = Field(default=0, ge=0, le=MAX_GRACE_S)
    """How long the old secret stays valid beside the new one."""


class AdminKeys:
    def __init__(
        self, registry: RegistryCalls, config_keys: list[ApiKey], model_names: set[str], gate: LimitGate
    ) -> None:
        self._registry = registry
        self._gate = gate
        self._config_keys = {key.name: key for key in config_keys}
        self._model_names = model_names

    async def create(self, request: Request, caller: Caller) -> JSONResponse:
        body = await parsed(KeyCreate, request)
        self._check_models(body.models)
        refuse_unpriced_spend(body.limits, self._registry.currency)
        secret = new_token()
        stored = StoredKey(
            name=body.name,
            tenant=body.tenant,
            digest=token_digest(secret),
            models=body.models,
            scopes=list(body.scopes),
            limits=body.limits.model_dump(),
            expires_at=None if body.expires_at is None else body.expires_at.timestamp(),
            metadata=body.metadata,
        )
        snapshot = await self._registry.change("create", stored, caller.key_name)
        return JSONResponse(_view(_find(snapshot, body.name)) | {"key": secret}, status_code=201)

    async def all(self) -> dict[str, Any]:
        snapshot = await self._registry.current()
        data = [_config_view(key) for key in self._config_keys.values()] + [_view(key) for key in snapshot.keys]
        return {"object": "list", "data": data}

    async def show(self, name: str) -> dict[str, Any]:
        """With what each of its budgets has used (or reserved) in its current period."""
        self._registry.watch()
        if name in self._config_keys:
            key = self._config_keys[name]
            view = _config_view(key)
        else:
            stored = _find(await self._registry.current(), name)
            key, view = as_api_key(stored), _view(stored)
        return view | {"budget_used": await self._gate.budget_used(Subject.key(key.name, key.limits))}

    async def update(self, request: Request, caller: Caller, name: str) -> dict[str, Any]:
        body = await parsed(KeyUpdate, request)
        changes = changes_of(body, nullable=("expires_at", "tenant"))
        if "models" in changes:
            self._check_models(body.models)
        if "limits" in changes:
            refuse_unpriced_spend(body.limits, self._registry.currency)
            changes["limits"] = body.limits.model_dump()
        if "expires_at" in changes:
            changes["expires_at"] = None if body.expires_at is None else body.expires_at.timestamp()
        return _view(_find(await self._registry.change("update", "key", name, changes, caller.key_name), name))

    async def rotate(self, request: Request, caller: Caller, name: str) -> dict[str, Any]:
        body = await parsed(KeyRotate, request, empty_ok=True)
        if name in self._config_keys:
            raise Conflict(f"API key {name!r} is defined in the config: rotate it there")
        secret = new_token()
        snapshot = await self._registry.change("rotate", name, token_digest(secret), body.grace_s, caller.key_name)
        return _view(_find(snapshot, name)) | {"key": secret}

    async def delete(self, caller: Caller, name: str) -> dict[str, Any]:
        await self._registry.change("delete", "key", name, caller.key_name)
        return {"object": "api_key.deleted", "name": name, "deleted": True}

    async def audit(self, request: Request) -> dict[str, Any]:
        """The latest changes first, at most `limit` (100 unless given; 1,000 at most). The
        database reads a negative limit as none, and cannot bind one past 64 bits."""
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise BadRequest("limit: must be a whole number") from None
        if limit < 1:
            raise BadRequest("limit: must be at least 1")
        return {"object": "list", "data": await self._registry.read("audit", min(limit, 1000))}

    def _check_models(self, patterns: list[str]) -> None:
        """As the config's keys are checked: a pattern must match, and a plain name be, a model."""
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in self._model_names):
                known = ", ".join(sorted(self._model_names))
                raise BadRequest(f"models: {pattern!r} is not a model id or alias, nor matches one ({known})")


def _find(snapshot: KeySnapshot, name: str) -> StoredKey:
    for key in snapshot.keys:
        if key.name == name:
            return key
    raise NotFound(f"no API key named {name!r}")


def _view(key: StoredKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "name": key.name,
        "tenant": key.tenant,
        "source": "api",
        "models": key.models,
        "scopes": key.scopes,
        "limits": key.limits,
        "expires_at": iso(key.expires_at),
        "disabled": key.disabled,
        "metadata": key.metadata,
        "created_at": iso(key.created_at),
        "updated_at": iso(key.updated_at),
        "previous_key_valid_until": iso(key.previous_valid_until),
    }


def _config_view(key: ApiKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "name": key.name,
        "tenant": key.tenant,
        "source": "config",
        "models": key.models,
        "scopes": key.scopes,
        "limits": key.limits.model_dump(),
        "expires_at": None if key.expires_at is None else key.expires_at.isoformat(),
        "disabled": False,
    }
