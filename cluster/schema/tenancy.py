"""Who may call: API keys, their scopes and rate limits, and the usage ledger of what they used."""

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from cluster.schema.base import ENV_VAR, StrictModel, reject_duplicates


class SoftBudgets(StrictModel):
    """Thresholds that never refuse: each request admitted past one is counted
    (`llm_soft_budget_exceeded_requests`) and marked in the request log, and the first in a period
    is logged at WARNING; an operator's early warning before a hard budget refuses."""

    tokens_per_day: Annotated[int, Field(ge=1)] | None = Field(default=None, description="tokens per UTC day")
    tokens_per_month: Annotated[int, Field(ge=1)] | None = Field(default=None, description="tokens per UTC month")
    spend_per_day: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="spend per UTC day, in the models' price currency"
    )
    spend_per_month: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="spend per UTC month, in the models' price currency"
    )

    @property
    def any(self) -> bool:
        return (self.tokens_per_day, self.tokens_per_month, self.spend_per_day, self.spend_per_month) != (
            None,
            None,
            None,
            None,
        )


class KeyLimits(StrictModel):
    """A key's or a tenant's limits, over a sliding minute or (budgets) a UTC calendar period,
    enforced across the whole cluster; a tenant's are shared by all its keys, and a request must
    fit both its key's and its tenant's. Unset means unlimited. Tokens are prompt plus completion;
    a request reserves its `max_tokens` (budgets: and its prompt's bound; spend budgets: those
    priced at its model's prices) when admitted and settles to its real count when it ends."""

    requests_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="requests admitted in any minute"
    )
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="prompt and completion tokens in any minute; a request asking for more `max_tokens` "
        "than this is refused with 400, since no wait would help",
    )
    concurrent_requests: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="requests in flight at once"
    )
    tokens_per_day: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="a budget of prompt and completion tokens per UTC calendar day, held exactly: a request "
        "is admitted only if its reservation (its max_tokens and the most its prompt can count) fits what is "
        "left, and settles to its real count when it ends",
    )
    tokens_per_month: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="a budget of tokens per UTC calendar month, held as `tokens_per_day` is"
    )
    spend_per_day: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description="a budget of spend per UTC calendar day, in the currency of the models' `price`, held as "
        "`tokens_per_day` is: a request's reservation is priced at its model's prompt and completion prices "
        "(a model without a price costs nothing)",
    )
    spend_per_month: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="a budget of spend per UTC calendar month, held as `spend_per_day` is"
    )
    soft: SoftBudgets = Field(
        default_factory=SoftBudgets, description="thresholds that only log and count, never refuse"
    )

    @property
    def any(self) -> bool:
        """Asked on every request of a keyed caller, so read off the fields, not a dump."""
        return (
            self.requests_per_minute,
            self.tokens_per_minute,
            self.concurrent_requests,
            self.tokens_per_day,
            self.tokens_per_month,
            self.spend_per_day,
            self.spend_per_month,
        ) != (None, None, None, None, None, None, None) or self.soft.any

    @property
    def counts_tokens(self) -> bool:
        """Whether any limit counts tokens (or their spend), which a request must then reserve."""
        return (
            self.tokens_per_minute,
            self.tokens_per_day,
            self.tokens_per_month,
            self.spend_per_day,
            self.spend_per_month,
        ) != (None, None, None, None, None) or self.soft.any

    @property
    def has_spend(self) -> bool:
        return (self.spend_per_day, self.spend_per_month, self.soft.spend_per_day, self.soft.spend_per_month) != (
            None,
            None,
            None,
            None,
        )


Scope = Literal["chat", "admin"]
NAME = r"^[A-Za-z0-9_.-]{1,100}$"


class Tenant(StrictModel):
    """A customer whose keys share limits and budgets: a request of any of its keys counts toward
    both the key's limits and the tenant's, and the ledger records the tenant beside the key."""

    name: str = Field(pattern=NAME, description="the tenant's name in the ledger, logs and admin API")
    limits: KeyLimits = Field(default_factory=KeyLimits, description="limits and budgets its keys share (unset: none)")


class ApiKey(StrictModel):
    """A bearer token, never in plain text: its sha256 hex digest, or the name of an environment
    variable that holds it on the nodes running the ingress. `models` are names or glob patterns
    (`llama-*`) matched against each model's id and aliases; `scopes` say which routes the key
    may call: `chat` the chat routes, `admin` the admin routes (any valid key may call the info
    routes: `/v1/models`, filtered to the key's models, `/version`, `/hardware/info`)."""

    name: str = Field(
        pattern=NAME,
        description="the key's name in logs, metrics and the usage ledger; unique in the config",
    )
    tenant: str | None = Field(
        default=None,
        pattern=NAME,
        description="the tenant (of `auth.tenants`) the key belongs to, whose limits and budgets it shares",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="the sha256 hex digest of the token (`python -m cluster keys new` prints it); exactly "
        "one of `sha256` and `env`",
    )
    env: str | None = Field(
        default=None,
        pattern=ENV_VAR,
        description="the environment variable that holds the token on the nodes running the ingress; exactly "
        "one of `sha256` and `env`",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="refused from this instant on (UTC if no zone; a date means its midnight); quote it in YAML",
    )
    models: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["*"],
        description="the models the key may use: ids, aliases or glob patterns over them; a plain name must "
        "be a model of this config",
    )
    scopes: list[Scope] = Field(
        default_factory=lambda: ["chat"],
        min_length=1,
        description="the routes the key may call: `chat` the chat routes, `admin` the `/admin/` routes",
    )
    limits: KeyLimits = Field(default_factory=KeyLimits, description="the key's rate limits (unset: none)")

    @field_validator("expires_at", mode="before")
    @classmethod
    def _date_means_its_start(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, time.min)
        return value

    @field_validator("expires_at")
    @classmethod
    def _utc_unless_zoned(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> "ApiKey":
        if (self.sha256 is None) == (self.env is None):
            raise ValueError(f"key {self.name!r}: give exactly one of sha256 or env")
        return self

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of a model's names (id and aliases) matches one of the key's patterns."""
        return any(fnmatchcase(name, pattern) for name in names for pattern in self.models)


class LimiterSettings(StrictModel):
    """What an ingress replica does with a request of a limited key or tenant while the rate limiter
    does not answer (its replica died and Serve is replacing it, or a call timed out): refuse it
    (`closed`: 503 with `Retry-After`), or admit it without limits for a bounded time (`open`).
    Callers without limits never ask the limiter and are served either way. While it is down the
    replica looks again at most every half second, as requests come, and the policy ends once it
    answers. A replaced limiter has forgotten its minute windows and the requests in flight, and
    reads its budgets' use back from the usage ledger (docs/operations.md)."""

    on_failure: Literal["closed", "open"] = Field(
        default="closed",
        description="`closed`: refuse limited requests with 503 and `Retry-After` until the limiter answers; "
        "`open`: admit them without limits for at most `fail_open_max_s` (counted, "
        "`llm_requests_admitted_unlimited`), then refuse them as `closed` does",
    )
    fail_open_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="with `open`: how long an ingress replica admits limited requests without limits, counted "
        "from the first failure it saw; it bounds what an outage lets a key overrun",
    )
    timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="how long an ingress replica waits for the limiter's decision before it counts the limiter "
        "as down (a decision takes a few milliseconds)",
    )


class AuthConfig(StrictModel):
    """No keys means no auth: the chat and info routes are open to all, the admin routes to none.
    The config's keys are the bootstrap keys, which the admin API cannot change; keys made through
    the API (`/admin/keys`) live in the usage database and take effect on every ingress replica
    without a redeploy."""

    keys: list[ApiKey] = Field(default_factory=list, description="the API keys; none: no auth")
    tenants: list[Tenant] = Field(
        default_factory=list,
        description="tenants whose keys share limits and budgets; runtime ones are made through `/admin/tenants`",
    )
    runtime_keys: bool = Field(
        default=True,
        description="let admin keys make, change, rotate and revoke keys at runtime through `/admin/keys`, "
        "kept in `usage.database` (only with at least one key in the config)",
    )
    limiter: LimiterSettings = Field(
        default_factory=LimiterSettings,
        description="what limited requests get while the rate limiter does not answer",
    )

    @model_validator(mode="after")
    def _unique_names_and_tokens(self) -> "AuthConfig":
        reject_duplicates("key name", [key.name for key in self.keys])
        reject_duplicates("key sha256", [key.sha256.lower() for key in self.keys if key.sha256 is not None])
        reject_duplicates("tenant name", [tenant.name for tenant in self.tenants])
        tenants = {tenant.name for tenant in self.tenants}
        for index, key in enumerate(self.keys):
            if key.tenant is not None and key.tenant not in tenants:
                known = ", ".join(sorted(tenants)) or "none"
                raise ValueError(f"auth.keys.{index}.tenant: {key.tenant!r} is not a tenant of auth.tenants ({known})")
        return self

    @property
    def store_enabled(self) -> bool:
        return self.runtime_keys and bool(self.keys)


class UsageSettings(StrictModel):
    """The usage ledger: one row per request that reached an engine. The database is a SQLAlchemy
    URL; SQLite (the default) lives on the head node, where the ledger's single writer runs, and
    `~` means that node's home folder. A `postgresql+psycopg://…` URL needs the `postgres` extra.
    Each ingress replica sends its rows once per `flush_interval_s`, in one call, and keeps them
    until the ledger has stored them, retrying; rows the ledger cannot take meanwhile wait in
    `spill_directory` on the replica's node and are sent again, oldest first, when it answers
    (`llm_usage_rows_pending` counts them). A replica that crashes loses only the rows of its last
    interval; its rows on disk are sent by the next ingress replica on its node."""

    enabled: bool = Field(default=True, description="keep the ledger (and answer `/admin/usage`)")
    database: str = Field(
        default="sqlite:///~/.local/state/llm-serve/usage.sqlite",
        min_length=1,
        description="a SQLAlchemy URL: `sqlite:///PATH` on the head node, or `postgresql+psycopg://…`",
    )
    flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often each ingress replica sends the rows it holds, in one call; rows sent one per "
        "request delayed the next requests' first tokens",
    )
    spill_directory: str = Field(
        default="~/.local/state/llm-serve/usage-spill",
        min_length=1,
        description="where an ingress replica keeps the rows the ledger could not store yet, until it can: "
        "JSON lines in a folder per application, on the replica's node (`~` is that node's home folder)",
    )
    spill_max_rows: int = Field(
        default=1_000_000,
        ge=1,
        le=100_000_000,
        description="the most rows an ingress replica keeps waiting (a row is under 1 KB); past it new rows "
        "are dropped, counted (`llm_usage_rows_dropped`) and logged at ERROR",
    )
    retry_max_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="the longest wait between an ingress replica's attempts to store its rows while the "
        "ledger fails (the wait doubles from 0.5 s up to it)",
    )

    @field_validator("database")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("must be a sqlite:///PATH or postgresql://… URL")
        return value
