"""The ledger's store on a real SQLite file: rows once, totals by key and model over a range; the
ingress's side batches its rows."""

import asyncio
import contextvars
import sqlite3
import uuid

from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy.ledger import LedgerClient
from serve_app.tenancy.usage_store import UsageRow, UsageStore


def _row(key: str, model: str, at: float, prompt: int, completion: int, status: int = 200) -> UsageRow:
    return UsageRow(
        id=uuid.uuid4().hex,
        request_id="r",
        time=at,
        key=key,
        model=model,
        endpoint="/llm",
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason="stop",
        status=status,
        latency_ms=1.0,
    )


def test_totals_per_key_and_model_over_a_range(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/ledger/usage.sqlite")
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
            "total_tokens": 18,
        },
        {
            "key": "a",
            "model": "m2",
            "requests": 1,
            "failed_requests": 0,
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "total_tokens": 2,
        },
        {
            "key": "b",
            "model": "m1",
            "requests": 1,
            "failed_requests": 0,
            "prompt_tokens": 7,
            "completion_tokens": 8,
            "total_tokens": 15,
        },
    ]
    assert [t["requests"] for t in store.totals(None, None, key="a", model="m1")] == [3]


def test_rows_are_in_a_plain_sqlite_file_that_a_new_store_reads(tmp_path):
    url = f"sqlite:///{tmp_path}/usage.sqlite"
    UsageStore(url).add([_row("a", "m", 1, 2, 3)])
    assert UsageStore(url).totals(None, None)[0]["total_tokens"] == 5
    with sqlite3.connect(tmp_path / "usage.sqlite") as db:
        assert db.execute("select key, prompt_tokens, completion_tokens from usage").fetchall() == [("a", 2, 3)]


_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)
"""Stands for the serving request's context, which Serve reads to make a handle call its child."""


class _Method:
    def __init__(self, ledger: "_Ledger", name: str) -> None:
        self._ledger, self._name = ledger, name

    def remote(self, *args):
        self._ledger.calls.append((self._name, args, _REQUEST.get()))
        self._ledger.called.set()
        future = asyncio.get_running_loop().create_future()
        self._ledger.replies.append(future)
        if not self._ledger.hold_replies:
            future.set_result([] if self._name == "totals" else None)
        return future


class _Ledger:
    """A ledger handle that notes its calls, and the request context each was made in; `called`
    is set by the first call (and every later one: clear it to wait for the next)."""

    def __init__(self, hold_replies: bool = False) -> None:
        self.calls: list = []
        self.called = asyncio.Event()
        self.replies: list[asyncio.Future] = []
        self.hold_replies = hold_replies
        self.add, self.totals = _Method(self, "add"), _Method(self, "totals")

    def sent(self) -> list:
        return [
            (name, [row.request_id for row in args[0]] if name == "add" else args, context)
            for name, args, context in self.calls
        ]


def _finished(request_id: str, reached_engine: bool = True) -> FinishedRequest:
    _REQUEST.set(request_id)
    return FinishedRequest(
        request_id=request_id,
        endpoint="/llm",
        key_name=None,
        model="m",
        status=200,
        prompt_tokens=1,
        completion_tokens=2,
        finish_reason="stop",
        started_at=0.0,
        duration_s=0.1,
        ttft_s=0.01,
        mean_token_gap_s=None,
        reached_engine=reached_engine,
    )


def test_the_ingress_sends_the_rows_of_an_interval_in_one_call_outside_any_request():
    async def scenario():
        ledger = _Ledger()
        client = LedgerClient(ledger, flush_interval_s=0.05)
        for request_id in ("a", "b"):
            client.record(_finished(request_id))
        client.record(_finished("never-reached-an-engine", reached_engine=False))
        assert ledger.calls == []
        await asyncio.wait_for(ledger.called.wait(), 5)  # the flush interval's timer fired
        assert ledger.sent() == [("add", ["a", "b"], None)]
        client.record(_finished("c"))
        await client.totals(None, None, None, None)
        client.record(_finished("d"))
        await client.close()
        return ledger.sent()

    assert asyncio.run(scenario()) == [
        ("add", ["a", "b"], None),
        ("add", ["c"], None),  # held rows are stored before the totals are read
        ("totals", (None, None, None, None), "c"),
        ("add", ["d"], None),  # and before the replica stops
    ]


def test_held_rows_sent_for_the_totals_are_stored_even_if_the_admin_client_leaves():
    async def scenario():
        ledger = _Ledger(hold_replies=True)
        client = LedgerClient(ledger, flush_interval_s=60)
        client.record(_finished("a"))
        asking = asyncio.create_task(client.totals(None, None, None, None))
        await asyncio.wait_for(ledger.called.wait(), 5)  # the held rows' call is made, its reply held
        assert not asking.done()
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
        await client.close()  # nothing left to store: the rows went with the totals' call
        return ledger

    ledger = asyncio.run(scenario())
    assert ledger.sent() == [("add", ["a"], None)]
    assert not ledger.replies[0].cancelled()
