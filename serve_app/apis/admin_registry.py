"""What the admin routes for keys and for tenants share: their bodies' parsing and their calls to
the key registry, whose refusals become the statuses they name."""

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from serve_app.errors import NotFound, for_status, from_validation
from serve_app.tenancy.key_registry import KeyWatch, Refusal
from serve_app.tenancy.key_store import KeySnapshot


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("expires_at", mode="after", check_fields=False)
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


async def parsed(model: type[Body], request: Request, empty_ok: bool = False) -> Any:
    body = await request.body()
    if empty_ok and not body.strip():
        return model()
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body") from None


class RegistryCalls:
    def __init__(self, watch: KeyWatch | None) -> None:
        self._watch = watch

    def watch(self) -> KeyWatch:
        if self._watch is None:
            raise NotFound(
                "keys and tenants cannot be made at runtime in this config (it has no keys, or "
                "auth.runtime_keys: false)"
            )
        return self._watch

    async def current(self) -> KeySnapshot:
        return await self.watch().call("changes", -1, 0)

    async def change(self, method: str, *args: Any) -> KeySnapshot:
        result = await self.watch().call(method, *args)
        if isinstance(result, Refusal):
            raise for_status(result.status, result.message)
        return result
