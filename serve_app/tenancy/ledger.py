"""The usage ledger's deployment: the single writer of the usage rows.

Every ingress replica sends its rows, a flush interval's worth at a time, to the one `UsageLedger`
replica (`ledger_client.py` is the ingress's side), so SQLite needs no cross-process locking, and
a row stored survives the restart of the ingress replica that sent it. The ledger ignores a row it
already has (by the row's own id), so a batch sent twice, or replayed from disk after its first
call did reach the ledger, counts once.
"""

import logging
from collections.abc import Sequence
from typing import Any

from cluster.schema import UsageSettings
from serve_app.tenancy.database import single_writer_actor_options
from serve_app.tenancy.usage_store import DEFAULT_GROUPS, UsageRow, UsageStore

logger = logging.getLogger("ray.serve")


class LedgerWriteFailed(Exception):
    """The database did not store a batch; the client sends it again."""


class UsageLedger:
    """The single writer. Its methods block its event loop for a commit, which serializes them:
    nothing else runs in this replica."""

    def __init__(self, database: str) -> None:
        self._store = UsageStore(database)

    async def add(self, rows: list[UsageRow]) -> None:
        """Returns once the rows are committed; raises if they are not, so that the client keeps
        them (a plain exception: the database's own may not travel back to it)."""
        try:
            self._store.add(rows)
        except Exception as error:
            cause = getattr(error, "orig", None) or error  # the driver's error, without the SQL and its rows
            why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
            logger.warning("usage ledger: storing %d rows failed: %s", len(rows), why)
            raise LedgerWriteFailed(f"storing {len(rows)} rows failed: {why}") from None

    async def totals(
        self,
        since: float | None,
        until: float | None,
        key: str | None,
        model: str | None,
        group_by: Sequence[str] = DEFAULT_GROUPS,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        return self._store.totals(since, until, key, model, group_by, tenant)


def ledger_options(settings: UsageSettings) -> dict[str, Any]:
    return {
        "name": "usage-ledger",
        "num_replicas": 1,
        "max_ongoing_requests": 4096,
        "ray_actor_options": single_writer_actor_options(settings.database),
    }
