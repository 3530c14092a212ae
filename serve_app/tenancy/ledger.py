"""The usage ledger's deployment and the ingress's client of it.

Every ingress replica sends its rows, fire and forget, a flush interval's worth at a time, to one
`UsageLedger` replica: the single writer, so SQLite needs no cross-process locking, and a row
already sent survives the restart of the ingress replica that sent it.
"""

import asyncio
from typing import Any

import sqlalchemy as sa
from ray.serve.handle import DeploymentHandle

from cluster.schema import UsageSettings
from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy import detached
from serve_app.tenancy.usage_store import UsageRow, UsageStore

HEAD_NODE = "node:__internal_head__"


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
    """The ingress's side, a listener of finished requests. A request's row (unless it never
    reached an engine) waits here up to `flush_interval_s` and goes with the others of that time
    in one call: a handle call per row costs the replica that relays tokens more than the row is
    worth (`python -m bench.ledger_flush` measures it, docs/benchmarks.md has the figures). A
    replica that dies loses the rows it holds; one that stops gracefully stores them first."""

    def __init__(self, ledger: DeploymentHandle | None, flush_interval_s: float) -> None:
        self._ledger = ledger
        self._flush_interval_s = flush_interval_s
        self._held: list[UsageRow] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self._ledger is not None

    def record(self, request: FinishedRequest) -> None:
        if self._ledger is None or not request.reached_engine:
            return
        self._held.append(UsageRow.of(request))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)

    def flush(self) -> None:
        rows = self._take()
        if rows:
            detached.call(self._ledger, "add", rows)

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
            await asyncio.shield(detached.call(self._ledger, "add", rows))

    def _take(self) -> list[UsageRow]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._held = self._held, []
        return rows
