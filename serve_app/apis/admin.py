"""The admin routes' logic: usage totals from the ledger, for keys with the `admin` scope."""

import csv
import io
from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response

from serve_app.errors import BadRequest, NotFound
from serve_app.tenancy.ledger_client import LedgerClient
from serve_app.tenancy.usage_store import DEFAULT_GROUPS, GROUPS

LATEST_INSTANT = 253402300800
"""10000-01-01 in unix seconds: the first time `datetime` cannot represent."""
TOTALS = ("requests", "failed_requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost")


class Admin:
    def __init__(self, ledger: LedgerClient, currency: str | None = None) -> None:
        self._ledger = ledger
        self._currency = currency

    async def usage(self, request: Request) -> dict[str, Any] | Response:
        """Totals over `since` ≤ time < `until` (either may be left out), optionally for one `key`,
        `tenant` or `model`, per distinct value of the `group_by` fields (comma-separated, any of
        key, tenant, model, endpoint and day, the UTC date; key,model unless given; empty: one total), as
        JSON, or as CSV with `format=csv` (a header line, then a line per group). `cost` is in
        the models' price currency, and empty for a group of models without a price."""
        if not self._ledger.enabled:
            raise NotFound("the usage ledger is off in this config (usage.enabled: false)")
        query = request.query_params
        since, until = instant(query.get("since"), "since"), instant(query.get("until"), "until")
        group_by = groups(query.get("group_by"))
        shape = query.get("format", "json")
        if shape not in ("json", "csv"):
            raise BadRequest(f"format: {shape!r} is neither json nor csv")
        totals = await self._ledger.totals(
            since, until, query.get("key"), query.get("model"), group_by, query.get("tenant")
        )
        if shape == "csv":
            return Response(
                as_csv(group_by, totals),
                media_type="text/csv; charset=utf-8",
                headers={"content-disposition": 'attachment; filename="usage.csv"'},
            )
        return {
            "object": "usage",
            "since": iso(since),
            "until": iso(until),
            "group_by": group_by,
            "currency": self._currency,
            "data": totals,
        }


def groups(text: str | None) -> list[str]:
    """A query's `group_by`: names separated by commas, each once, in the order given."""
    if text is None:
        return list(DEFAULT_GROUPS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise BadRequest(f"group_by: {', '.join(map(repr, unknown))} is not one of {', '.join(GROUPS)}")
    return list(dict.fromkeys(names))


def as_csv(group_by: list[str], totals: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*group_by, *TOTALS])
    for row in totals:
        writer.writerow(["" if row[name] is None else row[name] for name in (*group_by, *TOTALS)])
    return out.getvalue()


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
    try:
        # The answer shows it in UTC: 0001-01-01 at +14:00 is a time of year 0 there.
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).timestamp()
    except OverflowError:
        raise BadRequest(f"{name}: {text!r} is not a time this server can represent") from None


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()
