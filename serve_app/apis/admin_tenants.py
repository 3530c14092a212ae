"""The admin routes that manage tenants at runtime (`/admin/tenants`): the customers whose keys
share limits and budgets. The config's tenants are listed too, and cannot be changed here; a
tenant that keys still belong to cannot be deleted, and a suspended one suspends all its keys."""

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cluster.schema import ApiKey, KeyLimits, Tenant
from cluster.schema.tenancy import NAME
from serve_app.apis.admin import iso
from serve_app.apis.admin_registry import Body, RegistryCalls, changes_of, parsed, refuse_unpriced_spend
from serve_app.errors import NotFound
from serve_app.tenancy.budgets import Subject
from serve_app.tenancy.key_store import KeySnapshot, StoredTenant
from serve_app.tenancy.keys import Caller, as_tenant
from serve_app.tenancy.limiter import LimitGate


class TenantCreate(Body):
    name: str = Field(pattern=NAME)
    limits: KeyLimits = Field(default_factory=KeyLimits)
    metadata: dict[str, str] = Field(default_factory=dict)


class TenantUpdate(Body):
    """Only the fields given change; `disabled: true` suspends the tenant and every key of it."""

    limits: KeyLimits | None = None
    metadata: dict[str, str] | None = None
    disabled: bool | None = None


class AdminTenants:
    def __init__(
        self, registry: RegistryCalls, config_tenants: list[Tenant], config_keys: list[ApiKey], gate: LimitGate
    ) -> None:
        self._registry = registry
        self._config_tenants = {tenant.name: tenant for tenant in config_tenants}
        self._config_keys = config_keys
        self._gate = gate

    async def create(self, request: Request, caller: Caller) -> JSONResponse:
        body = await parsed(TenantCreate, request)
        refuse_unpriced_spend(body.limits, self._registry.currency)
        stored = StoredTenant(name=body.name, limits=body.limits.model_dump(), metadata=body.metadata)
        snapshot = await self._registry.change("create", stored, caller.key_name)
        return JSONResponse(self._view(_find(snapshot, body.name), snapshot), status_code=201)

    async def all(self) -> dict[str, Any]:
        snapshot = await self._registry.current()
        data = [self._view(tenant, snapshot) for tenant in (*self._config_tenants.values(), *snapshot.tenants)]
        return {"object": "list", "data": data}

    async def show(self, name: str) -> dict[str, Any]:
        """With what each of its budgets has used (or reserved) in its current period, all its
        keys together."""
        snapshot = await self._registry.current()
        record = self._config_tenants.get(name) or _find(snapshot, name)
        tenant = record if isinstance(record, Tenant) else as_tenant(record)
        used = await self._gate.budget_used(Subject.tenant(tenant.name, tenant.limits))
        return self._view(record, snapshot) | {"budget_used": used}

    async def update(self, request: Request, caller: Caller, name: str) -> dict[str, Any]:
        body = await parsed(TenantUpdate, request)
        changes = changes_of(body)
        if "limits" in changes:
            refuse_unpriced_spend(body.limits, self._registry.currency)
            changes["limits"] = body.limits.model_dump()
        snapshot = await self._registry.change("update", "tenant", name, changes, caller.key_name)
        return self._view(_find(snapshot, name), snapshot)

    async def delete(self, caller: Caller, name: str) -> dict[str, Any]:
        await self._registry.change("delete", "tenant", name, caller.key_name)
        return {"object": "tenant.deleted", "name": name, "deleted": True}

    def _view(self, tenant: Tenant | StoredTenant, snapshot: KeySnapshot) -> dict[str, Any]:
        keys = [key.name for key in (*self._config_keys, *snapshot.keys) if key.tenant == tenant.name]
        if isinstance(tenant, Tenant):
            return {
                "object": "tenant",
                "name": tenant.name,
                "source": "config",
                "limits": tenant.limits.model_dump(),
                "disabled": False,
                "keys": keys,
            }
        return {
            "object": "tenant",
            "name": tenant.name,
            "source": "api",
            "limits": tenant.limits,
            "disabled": tenant.disabled,
            "metadata": tenant.metadata,
            "keys": keys,
            "created_at": iso(tenant.created_at),
            "updated_at": iso(tenant.updated_at),
        }


def _find(snapshot: KeySnapshot, name: str) -> StoredTenant:
    for tenant in snapshot.tenants:
        if tenant.name == name:
            return tenant
    raise NotFound(f"no tenant named {name!r}")
