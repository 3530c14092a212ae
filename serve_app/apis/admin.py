"""The admin routes' logic: usage totals from the ledger, for keys with the `admin` scope."""

from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from serve_app.errors import BadRequest, NotFound
from serve_app.tenancy.ledger import LedgerClient

LATEST_INSTANT = 253402300800
"""10000-01-01 in unix seconds: the first time `datetime` cannot represent."""


class Admin:
    def __init__(self, ledger: LedgerClient) -> None:
        self._ledger = ledger

    async def usage(self, request: Request) -> dict[str, Any]:
        """Totals per key and model, over `since` ≤ time < `until` (either may be left out),
        optionally for one `key` or `model`."""
        if not self._ledger.enabled:
            raise NotFound("the usage ledger is off in this config (usage.enabled: false)")
        query = request.query_params
        since, until = instant(query.get("since"), "since"), instant(query.get("until"), "until")
        totals = await self._ledger.totals(since, until, query.get("key"), query.get("model"))
        return {"object": "usage", "since": _iso(since), "until": _iso(until), "data": totals}


def instant(text: str | None, name: str) -> float | None:
    """A query's time bound: ISO 8601 (UTC unless zoned) or unix seconds."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= seconds < LATEST_INSTANT:  # NaN fails both comparisons
            raise BadRequest(f"{name}: {text!r} is not a time this server can represent")
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name}: {text!r} is neither an ISO 8601 time nor unix seconds") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()
