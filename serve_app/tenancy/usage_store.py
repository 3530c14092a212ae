"""The usage ledger's store: one durable row per request that reached an engine, the record
operators bill and audit from. SQLAlchemy Core over a URL: SQLite on the head node by default (WAL
journal, a commit per batch), or any Postgres by URL, with no other change."""

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from serve_app.telemetry.record import FinishedRequest


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
        )


_metadata = sa.MetaData()
_usage = sa.Table(
    "usage",
    _metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(200), nullable=False),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("key", sa.String(200)),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("endpoint", sa.String(50), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(50)),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)


class UsageStore:
    """The one interface to the database: add rows, total a time range."""

    def __init__(self, url: str) -> None:
        self._engine = sa.create_engine(_local_path(url))
        if self._engine.dialect.name == "sqlite":
            sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        _metadata.create_all(self._engine)
        insert = sqlite.insert if self._engine.dialect.name == "sqlite" else postgresql.insert
        self._insert = insert(_usage).on_conflict_do_nothing(index_elements=["id"])

    def add(self, rows: list[UsageRow]) -> None:
        """One transaction. Idempotent by row id, so a retried call never counts a request twice."""
        if not rows:
            return
        with self._engine.begin() as connection:
            connection.execute(self._insert, [asdict(row) for row in rows])

    def totals(
        self, since: float | None, until: float | None, key: str | None = None, model: str | None = None
    ) -> list[dict[str, Any]]:
        query = (
            sa.select(
                _usage.c.key,
                _usage.c.model,
                sa.func.count().label("requests"),
                sa.func.sum(sa.case((_usage.c.status >= 400, 1), else_=0)).label("failed_requests"),
                sa.func.sum(_usage.c.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(_usage.c.completion_tokens).label("completion_tokens"),
            )
            .group_by(_usage.c.key, _usage.c.model)
            .order_by(_usage.c.key, _usage.c.model)
        )
        if since is not None:
            query = query.where(_usage.c.time >= since)
        if until is not None:
            query = query.where(_usage.c.time < until)
        if key is not None:
            query = query.where(_usage.c.key == key)
        if model is not None:
            query = query.where(_usage.c.model == model)
        with self._engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(query)]
        for row in rows:
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        return rows


def _local_path(url: str) -> str:
    """`~` in a SQLite path means the home folder of the node the ledger runs on."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return url
    path = Path(parsed.database).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets the admin route read while rows are written; NORMAL sync keeps every committed row
    through a process crash, which is the failure a restarted replica is."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
