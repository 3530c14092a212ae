"""The ledger's store on a real SQLite file and, where a server can run here, on a throwaway
Postgres (`tests/postgres.py`): rows once, totals by key, model and UTC day over a range, client
text bounded to its column without losing its batch, and a failed write raised to the caller."""

import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from serve_app.tenancy.ledger import LedgerWriteFailed, UsageLedger
from serve_app.tenancy.usage_store import WIDTHS, UsageRow, UsageStore, bounded
from tests import postgres


def _row(key: str | None, model: str, at: float, prompt: int, completion: int, status: int = 200, **fields) -> UsageRow:
    return UsageRow(
        **{
            "id": uuid.uuid4().hex,
            "request_id": "r",
            "time": at,
            "key": key,
            "model": model,
            "endpoint": "/llm",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "finish_reason": "stop",
            "status": status,
            "latency_ms": 1.0,
        }
        | fields
    )


@pytest.fixture(scope="module")
def postgres_server():
    reason = postgres.unavailable()
    if reason:
        pytest.skip(reason)
    with postgres.server() as base:
        yield base


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    """A fresh database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger/usage.sqlite"
    return postgres.new_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def store(url):
    store = UsageStore(url)
    yield store
    store.dispose()


def test_totals_per_key_and_model_over_a_range(store):
    rows = [
        _row("a", "m1", 100, 3, 4),
        _row("a", "m1", 150, 5, 6, status=499),
        _row("a", "m2", 160, 1, 1),
        _row("b", "m1", 170, 7, 8),
        _row("a", "m1", 300, 100, 100),
    ]
    store.add(rows[:2])
    store.add(rows[2:])
    store.add(rows[:1])  # a retried call: still one row
    store.add([])
    totals = store.totals(since=100, until=300)
    assert totals == [
        {
            "key": "a",
            "model": "m1",
            "requests": 2,
            "failed_requests": 1,
            "prompt_tokens": 8,
            "completion_tokens": 10,
            "cost": None,
            "total_tokens": 18,
        },
        {
            "key": "a",
            "model": "m2",
            "requests": 1,
            "failed_requests": 0,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "cost": None,
            "total_tokens": 2,
        },
        {
            "key": "b",
            "model": "m1",
            "requests": 1,
            "failed_requests": 0,
            "prompt_tokens": 7,
            "completion_tokens": 8,
            "cost": None,
            "total_tokens": 15,
        },
    ]
    assert [t["requests"] for t in store.totals(None, None, key="a", model="m1")] == [3]


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_totals_by_utc_day_by_any_grouping_and_over_all(store):
    store.add(
        [
            _row("a", "m1", _at("2026-03-01T00:00:00"), 1, 1),
            _row("a", "m1", _at("2026-03-01T23:59:59.9"), 2, 2),
            _row("b", "m2", _at("2026-03-01T12:00:00"), 3, 3, status=500),
            _row("a", "m1", _at("2026-03-02T00:00:00"), 4, 4),
            _row(None, "m2", _at("2026-03-31T23:00:00"), 5, 5, endpoint="/v1/completions"),
        ]
    )

    def picked(group_by, **query):
        return [
            tuple(row[name] for name in (*group_by, "requests", "failed_requests", "total_tokens"))
            for row in store.totals(query.pop("since", None), query.pop("until", None), group_by=group_by, **query)
        ]

    assert picked(["day"]) == [("2026-03-01", 3, 1, 12), ("2026-03-02", 1, 0, 8), ("2026-03-31", 1, 0, 10)]
    assert picked(["model", "day"]) == [
        ("m1", "2026-03-01", 2, 0, 6),
        ("m1", "2026-03-02", 1, 0, 8),
        ("m2", "2026-03-01", 1, 1, 6),
        ("m2", "2026-03-31", 1, 0, 10),
    ]
    assert picked(["day", "key"], key="a") == [("2026-03-01", "a", 2, 0, 6), ("2026-03-02", "a", 1, 0, 8)]
    assert picked([]) == [(5, 1, 30)]
    assert picked(["endpoint"]) == [("/llm", 4, 1, 20), ("/v1/completions", 1, 0, 10)]
    assert picked([], since=_at("2027-01-01T00:00:00")) == []  # nothing in range: no row, not a row of nulls
    assert picked(["day"], since=_at("2026-03-01T12:00:00"), until=_at("2026-03-02T00:00:00")) == [
        ("2026-03-01", 2, 1, 10)
    ]
    assert set(store.totals(None, None, group_by=["day"])[0]) == {
        "day",
        "requests",
        "failed_requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
    }
    with pytest.raises(ValueError, match="cannot group usage by"):
        store.totals(None, None, group_by=["team"])


def test_long_client_text_is_bounded_and_stored_with_its_batch(store):
    """A 5,000-character x-request-id once failed its whole batch on Postgres (a 200-character
    column); now it is cut to a prefix and a digest, and two long ids alike up to the cut stay
    apart."""
    long_id = "x" * 4000 + "-a" * 500
    other = "x" * 4000 + "-b" * 500
    assert len(long_id) == 5000
    weird = "bad\x00text\ud800"
    rows = [
        _row("k", "m", 1, 1, 1, request_id="short"),
        _row("k", "m", 2, 1, 1, request_id=long_id),
        _row("k", "m", 3, 1, 1, request_id=other),
        _row("k" * 300, "m" * 300, 4, 1, 1, endpoint="/" * 80, finish_reason="f" * 80),
        _row("k", "m", 5, 1, 1, request_id=weird),
    ]
    store.add(rows)
    stored = {row.id: row for row in store.rows()}
    assert len(stored) == 5
    assert stored[rows[0].id].request_id == "short"
    first, second = stored[rows[1].id].request_id, stored[rows[2].id].request_id
    assert len(first) == len(second) == WIDTHS["request_id"]
    assert first != second and first.startswith("x" * 189) and second.startswith("x" * 189)
    assert first == bounded(long_id, 200)
    wide = stored[rows[3].id]
    assert (len(wide.key), len(wide.model), len(wide.endpoint), len(wide.finish_reason)) == (200, 200, 50, 50)
    assert stored[rows[4].id].request_id == "bad\ufffdtext?"
    # The key's totals are asked by the name as given, bounded the same way.
    assert store.totals(None, None, key="k" * 300)[0]["requests"] == 1


def test_a_refused_row_does_not_hold_back_its_batch(store, caplog):
    """No bounded row should be refused; if one is (here an integer past Postgres's range; SQLite
    takes it), the others are stored and it is logged whole."""
    huge = _row("k", "m", 1, 2**40, 1, request_id="huge")
    rows = [_row("k", "m", 1, 1, 1), huge, _row("k", "m", 1, 1, 1)]
    refused = store.add(rows)
    if store._engine.dialect.name == "postgresql":
        assert refused == 1 and store.count() == 2
        assert "refused a row, left out" in caplog.text and "'huge'" in caplog.text
    else:
        assert refused == 0 and store.count() == 3


def test_the_ledger_raises_when_the_database_cannot_store_and_the_retry_counts_once(url):
    ledger = UsageLedger(url)
    rows = [_row("k", "m", 1, 1, 1) for _ in range(3)]
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE usage RENAME TO usage_away"))
    with pytest.raises(LedgerWriteFailed, match="storing 3 rows failed: ") as failed:
        asyncio.run(ledger.add(rows))
    assert "INSERT" not in str(failed.value) and "\n" not in str(failed.value)  # the driver's word, not the SQL
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE usage_away RENAME TO usage"))
    asyncio.run(ledger.add(rows[:2]))
    asyncio.run(ledger.add(rows))  # the first two sent again
    assert asyncio.run(ledger.totals(None, None, "k", None))[0]["requests"] == 3
    engine.dispose()


def test_rows_are_in_a_plain_sqlite_file_that_a_new_store_reads(tmp_path):
    url = f"sqlite:///{tmp_path}/usage.sqlite"
    UsageStore(url).add([_row("a", "m", 1, 2, 3)])
    assert UsageStore(url).totals(None, None)[0]["total_tokens"] == 5
    with sqlite3.connect(tmp_path / "usage.sqlite") as db:
        assert db.execute("select key, prompt_tokens, completion_tokens from usage").fetchall() == [("a", 2, 3)]


def test_bounded_is_stable_and_keeps_distinct_texts_distinct():
    assert bounded(None, 10) is None
    assert bounded("short", 10) == "short"
    assert bounded("x" * 50, 50) == "x" * 50
    cut = bounded("y" * 51, 50)
    assert len(cut) == 50 and cut.startswith("y" * 39 + "~")
    assert bounded(cut, 50) == cut  # a bounded text is its own bound
    ids = {bounded("z" * 300 + str(n), 200) for n in range(1000)}
    assert len(ids) == 1000


def test_tenant_and_cost_are_stored_and_totalled_on_either_database(store):
    store.add([_row("a", "m", 100, 1, 2, tenant="acme", cost=0.5), _row("b", "m", 100, 3, 4, tenant="acme", cost=0.25)])
    store.add([_row("c", "m", 100, 5, 6)])
    totals = {row["tenant"]: (row["requests"], row["cost"]) for row in store.totals(None, None, group_by=["tenant"])}
    assert totals == {None: (1, None), "acme": (2, 0.75)}
    assert [row["key"] for row in store.totals(None, None, group_by=["key"], tenant="acme")] == ["a", "b"]


def test_a_ledger_an_earlier_version_made_gains_tenant_and_cost_and_keeps_its_rows(url):
    """The columns added since the first version are nullable: `create_tables` adds them to a
    table that exists (`create_all` alone would not), on SQLite and on Postgres."""
    import sqlalchemy as sa

    from serve_app.tenancy import usage_store
    from serve_app.tenancy.database import engine_for

    added = ("tenant", "cost")
    old = sa.Table("usage", sa.MetaData(), *(c.copy() for c in usage_store._usage.columns if c.name not in added))
    engine = engine_for(url)
    old.metadata.create_all(engine)
    row = {name: value for name, value in _row("k", "m", 1, 2, 3).to_json().items() if name not in added}
    with engine.begin() as connection:
        connection.execute(old.insert(), [row])
    engine.dispose()
    store = UsageStore(url)
    store.add([_row("k", "m", 2, 1, 1, tenant="acme", cost=1.5)])
    assert {
        (row["tenant"], row["total_tokens"], row["cost"]) for row in store.totals(None, None, group_by=["tenant"])
    } == {
        (None, 5, None),
        ("acme", 2, 1.5),
    }
    store.dispose()
