"""The admin routes that manage API keys at runtime (`/admin/keys`): JSON in and out, errors in
OpenAI's shape, for keys with the `admin` scope. A key's secret is made here, returned once (as
`"key"`) and never stored or shown again: the registry keeps its sha256 digest only. The config's
keys are listed too, and cannot be changed here."""

import time
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Annotated, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.keys import new_token, token_digest
from cluster.schema import ApiKey, KeyLimits, Scope
from serve_app.apis.admin import iso
from serve_app.errors import BadRequest, Conflict, NotFound, for_status, from_validation
from serve_app.tenancy.key_registry import KeyWatch, Refusal
from serve_app.tenancy.key_store import KeySnapshot, StoredKey
from serve_app.tenancy.keys import Caller, as_api_key
from serve_app.tenancy.limiter import LimitGate

KEY_NAME = r"^[A-Za-z0-9_.-]{1,100}$"
MAX_GRACE_S = 30 * 24 * 3600


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("expires_at", mode="after", check_fields=False)
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class KeyCreate(_Body):
    name: str = Field(pattern=KEY_NAME)
    models: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["*"])
    scopes: list[Scope] = Field(default_factory=lambda: ["chat"], min_length=1)
    expires_at: datetime | None = None
    limits: KeyLimits = Field(default_factory=KeyLimits)
    metadata: dict[str, str] = Field(default_factory=dict)


class KeyUpdate(_Body):
    """Only the fields given change; `disabled: true` suspends the key, `false` restores it."""

    models: list[Annotated[str, Field(min_length=1)]] | None = None
    scopes: list[Scope] | None = Field(default=None, min_length=1)
    expires_at: datetime | None = None
    limits: KeyLimits | None = None
    metadata: dict[str, str] | None = None
    disabled: bool | None = None


class KeyRotate(_Body):
    grace_s: float = Field(default=0, ge=0, le=MAX_GRACE_S)
    """How long the old secret stays valid beside the new one."""


class AdminKeys:
    def __init__(
        self, watch: KeyWatch | None, config_keys: list[ApiKey], model_names: set[str], gate: LimitGate
    ) -> None:
        self._watch = watch
        self._gate = gate
        self._config_keys = {key.name: key for key in config_keys}
        self._model_names = model_names

    async def create(self, request: Request, caller: Caller) -> JSONResponse:
        body = await _parsed(KeyCreate, request)
        self._check_models(body.models)
        secret = new_token()
        stored = StoredKey(
            name=body.name,
            digest=token_digest(secret),
            models=body.models,
            scopes=list(body.scopes),
            limits=body.limits.model_dump(),
            expires_at=None if body.expires_at is None else body.expires_at.timestamp(),
            metadata=body.metadata,
        )
        snapshot = await self._change("create", stored, caller.key_name)
        return JSONResponse(_view(_find(snapshot, body.name)) | {"key": secret}, status_code=201)

    async def all(self) -> dict[str, Any]:
        snapshot = await self._current()
        data = [_config_view(key) for key in self._config_keys.values()] + [_view(key) for key in snapshot.keys]
        return {"object": "list", "data": data}

    async def show(self, name: str) -> dict[str, Any]:
        """With what each of its budgets has used (or reserved) in its current period."""
        self._registry()
        if name in self._config_keys:
            key = self._config_keys[name]
            view = _config_view(key)
        else:
            stored = _find(await self._current(), name)
            key, view = as_api_key(stored), _view(stored)
        return view | {"budget_used": await self._gate.budget_used(key)}

    async def update(self, request: Request, caller: Caller, name: str) -> dict[str, Any]:
        body = await _parsed(KeyUpdate, request)
        changes = body.model_dump(exclude_unset=True)
        for field_name, value in changes.items():
            if value is None and field_name != "expires_at":
                raise BadRequest(f"invalid request body: {field_name}: may not be null (leave it out to keep it)")
        if "models" in changes:
            self._check_models(body.models)
        if "limits" in changes:
            changes["limits"] = body.limits.model_dump()
        if "expires_at" in changes:
            changes["expires_at"] = None if body.expires_at is None else body.expires_at.timestamp()
        return _view(_find(await self._change("update", name, changes, caller.key_name), name))

    async def rotate(self, request: Request, caller: Caller, name: str) -> dict[str, Any]:
        body = await _parsed(KeyRotate, request, empty_ok=True)
        if name in self._config_keys:
            raise Conflict(f"API key {name!r} is defined in the config: rotate it there")
        current = _find(await self._current(), name)
        secret = new_token()
        changes = {
            "digest": token_digest(secret),
            "previous_digest": current.digest if body.grace_s > 0 else None,
            "previous_valid_until": time.time() + body.grace_s if body.grace_s > 0 else None,
        }
        snapshot = await self._change("update", name, changes, caller.key_name, "rotate")
        return _view(_find(snapshot, name)) | {"key": secret}

    async def delete(self, caller: Caller, name: str) -> dict[str, Any]:
        await self._change("delete", name, caller.key_name)
        return {"object": "api_key.deleted", "name": name, "deleted": True}

    async def audit(self, request: Request) -> dict[str, Any]:
        try:
            limit = min(int(request.query_params.get("limit", "100")), 1000)
        except ValueError:
            raise BadRequest("limit: must be a whole number") from None
        return {"object": "list", "data": await self._registry().call("audit", limit)}

    def _registry(self) -> KeyWatch:
        if self._watch is None:
            raise NotFound(
                "keys cannot be made at runtime in this config (it has no keys, or auth.runtime_keys: false)"
            )
        return self._watch

    async def _current(self) -> KeySnapshot:
        return await self._registry().call("changes", -1, 0)

    async def _change(self, method: str, *args: Any) -> KeySnapshot:
        result = await self._registry().call(method, *args)
        if isinstance(result, Refusal):
            raise for_status(result.status, result.message)
        return result

    def _check_models(self, patterns: list[str]) -> None:
        """As the config's keys are checked: a pattern must match, and a plain name be, a model."""
        for pattern in patterns:
            if not any(fnmatchcase(name, pattern) for name in self._model_names):
                known = ", ".join(sorted(self._model_names))
                raise BadRequest(f"models: {pattern!r} is not a model id or alias, nor matches one ({known})")


async def _parsed(model: type[_Body], request: Request, empty_ok: bool = False) -> Any:
    body = await request.body()
    if empty_ok and not body.strip():
        return model()
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body") from None


def _find(snapshot: KeySnapshot, name: str) -> StoredKey:
    for key in snapshot.keys:
        if key.name == name:
            return key
    raise NotFound(f"no API key named {name!r}")


def _view(key: StoredKey) -> dict[str, Any]:
    return {
        "object": "api_key",
        "name": key.name,
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
        "source": "config",
        "models": key.models,
        "scopes": key.scopes,
        "limits": key.limits.model_dump(),
        "expires_at": None if key.expires_at is None else key.expires_at.isoformat(),
        "disabled": False,
    }
