"""The usage ledger: one durable row per request that reached an engine, the record operators
bill and audit from.

Every ingress replica sends its rows, fire and forget, a flush interval's worth at a time, to one
`UsageLedger` replica: the single writer, so SQLite needs no cross-process locking, and a row
already sent survives the restart of the ingress replica that sent it. The store is SQLAlchemy
Core over a URL: SQLite on the head node by default (WAL journal, a commit per batch), or any
Postgres by URL, with no other change.
"""

import asyncio
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from ray.serve.handle import DeploymentHandle

from cluster.schema import UsageSettings
from serve_app import fire_and_forget
from serve_app.request_log import RequestRecord

HEAD_NODE = "node:__internal_head__"


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
    def of(cls, record: RequestRecord) -> "UsageRow":
        """`id` is ours, not the request id: clients choose request ids and may repeat them."""
        return cls(
            id=uuid.uuid4().hex, request_id=record.request_id, time=record.started_at, key=record.key_name,
            model=record.model or "", endpoint=record.endpoint, prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens, finish_reason=record.finish_reason,
            status=record.status, latency_ms=round(record.duration_s * 1000, 1),
        )


_metadata = sa.MetaData()
_usage = sa.Table(
    "usage", _metadata,
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
        query = sa.select(
            _usage.c.key, _usage.c.model,
            sa.func.count().label("requests"),
            sa.func.sum(sa.case((_usage.c.status >= 400, 1), else_=0)).label("failed_requests"),
            sa.func.sum(_usage.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(_usage.c.completion_tokens).label("completion_tokens"),
        ).group_by(_usage.c.key, _usage.c.model).order_by(_usage.c.key, _usage.c.model)
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


class UsageLedger:
    """The single writer. Its methods block its event loop for a commit, which serializes them:
    nothing else runs in this replica."""

    def __init__(self, database: str) -> None:
        self._store = UsageStore(database)

    async def add(self, rows: list[UsageRow]) -> None:
        self._store.add(rows)

    async def totals(
        self, since: float | None, until: float | None, key: str | None, model: str | None
    ) -> list[dict[str, Any]]:
        return self._store.totals(since, until, key, model)


def ledger_options(settings: UsageSettings) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": 0}
    if sa.make_url(settings.database).get_backend_name() == "sqlite":
        # The file must stay where it is whichever node the replica restarts on.
        actor["resources"] = {HEAD_NODE: 0.001}
    return {"name": "usage-ledger", "num_replicas": 1, "max_ongoing_requests": 4096, "ray_actor_options": actor}


class LedgerClient:
    """The ingress's side. A finished request's row (unless it never reached an engine) waits here
    up to `flush_interval_s` and goes with the others of that time in one call: a handle call per
    row was the largest item in the colocated replica's profile, and sending rows per request
    rather than once a second cost the first token 6 to 8 ms (`python -m bench.ledger_flush`).
    A replica that dies loses the rows it holds; one that stops gracefully stores them first."""

    def __init__(self, ledger: DeploymentHandle | None, flush_interval_s: float) -> None:
        self._ledger = ledger
        self._flush_interval_s = flush_interval_s
        self._held: list[UsageRow] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self._ledger is not None

    def record(self, record: RequestRecord) -> None:
        if self._ledger is None or not record.reached_engine:
            return
        self._held.append(UsageRow.of(record))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)

    def flush(self) -> None:
        rows = self._take()
        if rows:
            fire_and_forget.send(self._ledger, "add", rows)

    async def close(self) -> None:
        """Stores the rows held, for a replica about to stop."""
        await self._store(self._take())

    async def totals(
        self, since: float | None, until: float | None, key: str | None, model: str | None
    ) -> list[dict[str, Any]]:
        """The rows this replica holds are counted too: they are stored first. Those other ingress
        replicas hold are not, until their next flush."""
        await self._store(self._take())
        return await self._ledger.totals.remote(since, until, key, model)

    async def _store(self, rows: list[UsageRow]) -> None:
        """Awaited, yet a call of its own: a caller cancelled meanwhile (its client left) does not
        take the rows with it."""
        if rows:
            await asyncio.shield(fire_and_forget.send(self._ledger, "add", rows))

    def _take(self) -> list[UsageRow]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._held = self._held, []
        return rows
