"""`/admin/usage`'s logic on fake requests, over a real SQLite ledger behind a fake handle:
totals by any of key, model and UTC day, over a range, as JSON or CSV."""

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime

import pytest
from fastapi import Request

from serve_app.apis.admin import Admin
from serve_app.errors import BadRequest, NotFound
from serve_app.tenancy.usage_store import UsageRow, UsageStore


class _Handle:
    """A ledger handle answering from a store, as the ledger's replica would."""

    def __init__(self, store: UsageStore) -> None:
        self.store = store
        self.asked: list[tuple] = []
        self.totals = self

    def remote(self, *args):
        self.asked.append(args)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.store.totals(*args))
        return future


class _Client:
    """The ingress's LedgerClient as Admin sees it."""

    def __init__(self, handle: _Handle | None) -> None:
        self._handle = handle

    @property
    def enabled(self) -> bool:
        return self._handle is not None

    async def totals(self, since, until, key, model, group_by=("key", "model"), tenant=None):
        return await self._handle.totals.remote(since, until, key, model, tuple(group_by), tenant)


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _row(key, model, at, prompt, completion, status=200) -> UsageRow:
    return UsageRow(uuid.uuid4().hex, "r", _at(at), key, model, "/llm", prompt, completion, "stop", status, 1.0)


@pytest.fixture
def handle(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")
    store.add(
        [
            _row("a", "m1", "2026-05-01T10:00:00", 1, 2),
            _row("a", "m2", "2026-05-01T23:59:59", 3, 4, status=429),
            _row("b", "m1", "2026-05-02T00:00:01", 5, 6),
            _row(None, "m1", "2026-05-03T00:00:00", 7, 8),
        ]
    )
    return _Handle(store)


def _request(query: str = "") -> Request:
    scope = {"type": "http", "method": "GET", "path": "/admin/usage", "query_string": query.encode(), "headers": []}
    return Request(scope)


def _usage(handle, query: str = ""):
    return asyncio.run(Admin(_Client(handle)).usage(_request(query)))


def test_by_key_and_model_unless_asked_otherwise(handle):
    answer = _usage(handle, "since=2026-05-01T00:00:00Z&until=2026-05-03")
    assert answer["object"] == "usage" and answer["group_by"] == ["key", "model"]
    assert answer["since"] == "2026-05-01T00:00:00+00:00" and answer["until"] == "2026-05-03T00:00:00+00:00"
    assert [(row["key"], row["model"], row["requests"], row["total_tokens"]) for row in answer["data"]] == [
        ("a", "m1", 1, 3),
        ("a", "m2", 1, 7),
        ("b", "m1", 1, 11),
    ]


def test_by_day_and_by_any_fields_in_the_order_given(handle):
    by_day = _usage(handle, "group_by=day")["data"]
    assert [(row["day"], row["requests"], row["failed_requests"], row["total_tokens"]) for row in by_day] == [
        ("2026-05-01", 2, 1, 10),
        ("2026-05-02", 1, 0, 11),
        ("2026-05-03", 1, 0, 15),
    ]
    assert "key" not in by_day[0] and "model" not in by_day[0]
    by_model_day = _usage(handle, "group_by=model,day,model&model=m1")
    assert by_model_day["group_by"] == ["model", "day"]
    assert [(row["model"], row["day"]) for row in by_model_day["data"]] == [
        ("m1", "2026-05-01"),
        ("m1", "2026-05-02"),
        ("m1", "2026-05-03"),
    ]
    everything = _usage(handle, "group_by=")["data"]
    assert [(row["requests"], row["total_tokens"]) for row in everything] == [(4, 36)]


def test_as_csv(handle):
    response = _usage(handle, "group_by=day,key&format=csv")
    assert response.media_type == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="usage.csv"'
    lines = list(csv.reader(io.StringIO(response.body.decode())))
    assert lines == [
        ["day", "key", "requests", "failed_requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost"],
        ["2026-05-01", "a", "2", "1", "4", "6", "10", ""],  # no price: no cost
        ["2026-05-02", "b", "1", "0", "5", "6", "11", ""],
        ["2026-05-03", "", "1", "0", "7", "8", "15", ""],  # a request made without a key
    ]
    assert response.body.decode().endswith("\r\n")
    empty = _usage(handle, "since=2030-01-01&format=csv")
    assert (
        empty.body.decode()
        == "key,model,requests,failed_requests,prompt_tokens,completion_tokens,total_tokens,cost\r\n"
    )


@pytest.mark.parametrize(
    "query, complaint",
    [
        ("group_by=team,day", "group_by: 'team' is not one of key, tenant, model, endpoint, day"),
        ("format=xml", "format: 'xml' is neither json nor csv"),
        ("since=yesterday", "since: 'yesterday' is neither an ISO 8601 time nor unix seconds"),
    ],
)
def test_bad_queries_are_400s(handle, query, complaint):
    with pytest.raises(BadRequest, match=complaint):
        _usage(handle, query)
    assert handle.asked == []


def test_no_ledger_is_a_404():
    with pytest.raises(NotFound, match="usage ledger is off"):
        _usage(None)
