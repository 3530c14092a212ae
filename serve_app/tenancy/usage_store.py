"""The usage ledger's store: one durable row per request that reached an engine, the record
operators bill and audit from. SQLAlchemy Core over a URL: SQLite on the head node by default (WAL
journal, a commit per batch), or any Postgres by URL, with no other change.

Some of a row's text comes from clients (the request id is their `x-request-id`, as long as they
like), so every text field is bounded to its column before it is stored: a row too wide for its
column would fail its whole batch on Postgres, which enforces widths (SQLite does not)."""

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import MISSING, Field, asdict, dataclass, fields, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy.database import create_tables, engine_for

logger = logging.getLogger("ray.serve")

WIDTHS = {"request_id": 200, "key": 200, "tenant": 200, "model": 200, "endpoint": 50, "finish_reason": 50}
"""The text columns' widths, in characters (Postgres's `varchar(n)` counts characters)."""
DIGEST_CHARS = 10
GROUPS = ("key", "tenant", "model", "endpoint", "day")
"""What `/admin/usage` can total by; `endpoint` is the route (`/llm`, `/v1/completions`, …), `day`
the UTC calendar day of a request's arrival."""
DEFAULT_GROUPS = ("key", "model")


def bounded(text: str | None, width: int) -> str | None:
    """`text` fit for a column of `width` characters that any database accepts: NULs (Postgres
    refuses them) and lone surrogates (UTF-8 cannot encode them) replaced, and a text too long
    cut to a recognizable prefix and a digest of the whole, so that distinct long texts (two
    clients' long request ids that share their first 189 characters) stay distinct. A bounded
    text is its own bound."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        encoded = text.encode(errors="replace")
        text = encoded.decode()
    if len(text) <= width:
        return text
    return f"{text[: width - DIGEST_CHARS - 1]}~{hashlib.sha256(encoded).hexdigest()[:DIGEST_CHARS]}"


@dataclass(frozen=True)
class UsageRow:
    id: str
    request_id: str
    time: float
    key: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    status: int
    latency_ms: float
    tenant: str | None = None
    cost: float | None = None
    """Its tokens at its model's prices, when the model has one."""

    @classmethod
    def of(cls, request: FinishedRequest) -> "UsageRow":
        """`id` is ours, not the request id: clients choose request ids and may repeat them."""
        return cls(
            id=uuid.uuid4().hex,
            request_id=request.request_id,
            time=request.started_at,
            key=request.key_name,
            model=request.model or "",
            endpoint=request.endpoint,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            finish_reason=request.finish_reason,
            status=request.status,
            latency_ms=round(request.duration_s * 1000, 1),
            tenant=request.tenant,
            cost=request.cost,
        ).bounded()

    def bounded(self) -> "UsageRow":
        """This row with its text fields bounded to their columns (itself when they all fit)."""
        changed = {}
        for name, width in WIDTHS.items():
            value = getattr(self, name)
            fit = bounded(value, width)
            if fit != value:
                changed[name] = fit
        return replace(self, **changed) if changed else self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UsageRow":
        """A row as `to_json` gave it, perhaps by another version: fields it lacks are an error
        (unless they have a default: an earlier version's rows lack the later fields), fields it
        has that this version does not are left out."""
        return cls(**{field.name: data[field.name] for field in fields(cls) if field.name in data or _required(field)})


_metadata = sa.MetaData()
_usage = sa.Table(
    "usage",
    _metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(WIDTHS["request_id"]), nullable=False),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("key", sa.String(WIDTHS["key"])),
    sa.Column("model", sa.String(WIDTHS["model"]), nullable=False),
    sa.Column("endpoint", sa.String(WIDTHS["endpoint"]), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(WIDTHS["finish_reason"])),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("tenant", sa.String(WIDTHS["tenant"])),
    sa.Column("cost", sa.Float),
)


class UsageStore:
    """The one interface to the database: add rows, total a time range."""

    def __init__(self, url: str) -> None:
        self._engine = engine_for(url)
        create_tables(self._engine, _metadata)
        insert = sqlite.insert if self._engine.dialect.name == "sqlite" else postgresql.insert
        self._insert = insert(_usage).on_conflict_do_nothing(index_elements=["id"])

    def add(self, rows: Sequence[UsageRow]) -> int:
        """One transaction, or an exception (the database is unreachable, locked, read-only, full):
        then nothing of the batch is stored and the caller sends it again. Idempotent by row id, so
        a batch sent again, in whole or in part, never counts a request twice.

        A batch the database refuses for what a row holds (no bounded row should be) is stored row
        by row instead, so that one bad row cannot hold back the others; a row refused alone is
        logged whole, at ERROR, and left out. Returns the number of rows left out so."""
        if not rows:
            return 0
        values = [row.bounded().to_json() for row in rows]
        try:
            with self._engine.begin() as connection:
                connection.execute(self._insert, values)
            return 0
        except (sa.exc.DataError, sa.exc.IntegrityError) as error:
            logger.warning(
                "usage ledger: the database refused a batch of %d rows (%s); storing them one by one",
                len(values),
                _first_line(error),
            )
        refused = 0
        for value in values:
            try:
                with self._engine.begin() as connection:
                    connection.execute(self._insert, [value])
            except (sa.exc.DataError, sa.exc.IntegrityError) as error:
                refused += 1
                logger.error("usage ledger: the database refused a row, left out: %s (%s)", value, _first_line(error))
        return refused

    def totals(
        self,
        since: float | None,
        until: float | None,
        key: str | None = None,
        model: str | None = None,
        group_by: Sequence[str] = DEFAULT_GROUPS,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Totals over `since` ≤ time < `until`, one row per distinct value of the `group_by`
        fields (any of `GROUPS`, in the order given; none: one row for all, if any), ordered by
        them. `day` is a UTC date, `YYYY-MM-DD`. `cost` is None for a group of unpriced rows."""
        unknown = [name for name in group_by if name not in GROUPS]
        if unknown:
            raise ValueError(f"cannot group usage by {unknown}; by any of {', '.join(GROUPS)}")
        groups = [self._group_column(name) for name in dict.fromkeys(group_by)]
        query = sa.select(
            *groups,
            sa.func.count().label("requests"),
            sa.func.sum(sa.case((_usage.c.status >= 400, 1), else_=0)).label("failed_requests"),
            sa.func.sum(_usage.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(_usage.c.completion_tokens).label("completion_tokens"),
            sa.func.sum(_usage.c.cost).label("cost"),
        )
        if groups:
            query = query.group_by(*groups).order_by(*groups)
        if since is not None:
            query = query.where(_usage.c.time >= since)
        if until is not None:
            query = query.where(_usage.c.time < until)
        if key is not None:
            query = query.where(_usage.c.key == bounded(key, WIDTHS["key"]))
        if model is not None:
            query = query.where(_usage.c.model == bounded(model, WIDTHS["model"]))
        if tenant is not None:
            query = query.where(_usage.c.tenant == bounded(tenant, WIDTHS["tenant"]))
        with self._engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        totals = []
        for row in rows:
            if not row["requests"]:
                continue  # no grouping over an empty range: one row of nulls
            for name in ("failed_requests", "prompt_tokens", "completion_tokens"):
                row[name] = int(row[name])
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
            if row["cost"] is not None:
                row["cost"] = round(row["cost"], 9)
            totals.append(row)
        return totals

    def _group_column(self, name: str) -> sa.ColumnElement:
        if name != "day":
            return _usage.c[name]
        if self._engine.dialect.name == "sqlite":
            return sa.func.date(_usage.c.time, "unixepoch").label("day")
        utc = sa.func.timezone("UTC", sa.func.to_timestamp(_usage.c.time))
        return sa.func.to_char(utc, "YYYY-MM-DD").label("day")

    def count(self, **where: Any) -> int:
        """How many rows match, by column values (for audits and tests)."""
        query = sa.select(sa.func.count()).select_from(_usage)
        for name, value in where.items():
            query = query.where(_usage.c[name] == value)
        with self._engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def rows(self) -> list[UsageRow]:
        """Every row, oldest first (for audits and tests: not for a large ledger)."""
        with self._engine.connect() as connection:
            result = connection.execute(sa.select(_usage).order_by(_usage.c.time, _usage.c.id))
            return [UsageRow(**row._mapping) for row in result]

    def dispose(self) -> None:
        self._engine.dispose()


def _required(field: Field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
