"""What the admin routes for keys and for tenants share: their bodies' parsing and their calls to
the key registry, whose refusals become the statuses they name."""

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from ray.exceptions import RayActorError

from cluster.schema import KeyLimits
from serve_app.errors import BadRequest, NotFound, Overloaded, for_status, from_validation
from serve_app.tenancy.key_registry import KeyWatch, Refusal
from serve_app.tenancy.key_store import KeySnapshot


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("expires_at", mode="after", check_fields=False)
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        """A time is stored as unix seconds and shown in UTC: one whose UTC date falls outside
        years 1 to 9999 (0001-01-01 at +14:00) could be stored, and then not shown, breaking
        every listing of the keys."""
        if value is None:
            return None
        value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise ValueError("must be a time whose UTC date is within years 1 to 9999") from None
        return value


async def parsed(model: type[Body], request: Request, empty_ok: bool = False) -> Any:
    body = await request.body()
    if empty_ok and not body.strip():
        return model()
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body", body) from None


def changes_of(body: Body, nullable: tuple[str, ...] = ()) -> dict[str, Any]:
    """A PATCH body's fields as given; null only where it means something (leaving a field out
    keeps it)."""
    changes = body.model_dump(exclude_unset=True)
    for field_name, value in changes.items():
        if value is None and field_name not in nullable:
            raise BadRequest(f"invalid request body: {field_name}: may not be null (leave it out to keep it)")
    return changes


def refuse_unpriced_spend(limits: KeyLimits, currency: str | None) -> None:
    """As the config refuses them: a spend budget over models without prices never moves, and an
    operator would believe spending capped when it is not."""
    if limits.has_spend and currency is None:
        raise BadRequest("limits: spend budgets need a `price` on at least one model of the config; none has one")


class RegistryCalls:
    def __init__(self, watch: KeyWatch | None, currency: str | None = None) -> None:
        self._watch = watch
        self.currency = currency
        """The models' price currency, for the checks of spend budgets."""

    def watch(self) -> KeyWatch:
        if self._watch is None:
            raise NotFound(
                "keys and tenants cannot be made at runtime in this config (it has no keys, or "
                "auth.runtime_keys: false)"
            )
        return self._watch

    async def current(self) -> KeySnapshot:
        return await self.read("changes", -1, 0)

    async def read(self, method: str, *args: Any) -> Any:
        return await self._call("the key registry is unavailable; retry shortly", method, *args)

    async def change(self, method: str, *args: Any) -> KeySnapshot:
        # A replica that dies with the call on it may have died before or after the store committed.
        lost = (
            "the key registry was lost during the change, which may or may not have been made: "
            "read it back before you retry (a key made or rotated so has lost its new secret: rotate it)"
        )
        result = await self._call(lost, method, *args)
        if isinstance(result, Refusal):
            raise for_status(result.status, result.message)
        return result

    async def _call(self, lost: str, method: str, *args: Any) -> Any:
        """The registry's answer; a 503 saying `lost` if its replica is gone."""
        try:
            return await self.watch().call(method, *args)
        except RayActorError:
            raise Overloaded(lost) from None
