"""The ingress's side of the usage ledger, without Ray: a fake ledger handle (that can fail, hold
or lose its replies) in front of a real SQLite store. Rows go in one call per interval, outside any
request; a batch is the client's until the ledger acknowledges it; while the ledger fails, rows
wait on disk, bounded, and a new client (the replica that replaces a stopped or crashed one)
replays them; nothing is lost in silence and nothing is counted twice."""

import asyncio
import contextvars
import json
import logging
import time

import pytest

from cluster.schema import UsageSettings
from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy import ledger_client as ledger_module
from serve_app.tenancy.ledger_client import LedgerClient
from serve_app.tenancy.spill import Spill
from serve_app.tenancy.usage_store import UsageRow, UsageStore

_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)
"""Stands for the serving request's context, which Serve reads to make a handle call its child."""


@pytest.fixture(autouse=True)
def quick(monkeypatch, caplog):
    monkeypatch.setattr(ledger_module, "FIRST_RETRY_S", 0.02)
    monkeypatch.setattr(ledger_module, "ADOPT_EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="ray.serve")
    logging.getLogger("ray.serve").addHandler(caplog.handler)  # Ray's logging config may not propagate it
    yield
    logging.getLogger("ray.serve").removeHandler(caplog.handler)


class _Method:
    def __init__(self, ledger: "_Ledger", name: str) -> None:
        self._ledger, self._name = ledger, name

    def remote(self, *args):
        self._ledger.calls.append((self._name, args, _REQUEST.get()))
        self._ledger.called.set()
        future = asyncio.get_running_loop().create_future()
        self._ledger.replies.append(future)
        if not self._ledger.hold_replies:
            try:
                future.set_result(self._ledger.answer(self._name, args))
            except Exception as error:
                future.set_exception(error)
        return future


class _Ledger:
    """A ledger handle that notes its calls and the request context each was made in (`called`
    is set by every call: clear it to wait for the next). With a store, it stores; `down` fails
    every add, `failing` the next few, `unanswered` the next few after storing them (a replica
    that dies between its commit and its reply)."""

    def __init__(self, store: UsageStore | None = None, hold_replies: bool = False) -> None:
        self.store = store
        self.calls: list = []
        self.called = asyncio.Event()
        self.replies: list[asyncio.Future] = []
        self.hold_replies = hold_replies
        self.down = False
        self.failing = 0
        self.unanswered = 0
        self.add, self.totals = _Method(self, "add"), _Method(self, "totals")

    def answer(self, name: str, args: tuple):
        if name == "totals":
            return self.store.totals(*args) if self.store else []
        if self.down or self.failing:
            self.failing = max(0, self.failing - 1)
            raise RuntimeError("ActorDiedError: the usage-ledger replica died")
        if self.store:
            self.store.add(args[0])
        if self.unanswered:
            self.unanswered -= 1
            raise RuntimeError("the replica died before it answered")
        return None

    def sent(self) -> list:
        return [
            (name, [row.request_id for row in args[0]] if name == "add" else args, context)
            for name, args, context in self.calls
        ]

    def added(self) -> list[list[str]]:
        return [ids for name, ids, _ in self.sent() if name == "add"]


class _Metrics:
    def __init__(self) -> None:
        self.pending, self.failures, self.dropped = 0, 0, 0

    def waiting(self, rows: int) -> None:
        self.pending = rows

    def failed(self) -> None:
        self.failures += 1

    def lost(self, rows: int) -> None:
        self.dropped += rows


def _settings(tmp_path, **fields) -> UsageSettings:
    return UsageSettings(
        **{"spill_directory": str(tmp_path / "spill"), "flush_interval_s": 0.02, "retry_max_s": 0.1} | fields
    )


def _finished(request_id: str, reached_engine: bool = True) -> FinishedRequest:
    _REQUEST.set(request_id)
    return FinishedRequest(
        request_id=request_id,
        endpoint="/llm",
        key_name="k",
        model="m",
        status=200,
        prompt_tokens=1,
        completion_tokens=2,
        finish_reason="stop",
        started_at=time.time(),
        duration_s=0.1,
        ttft_s=0.01,
        mean_token_gap_s=None,
        max_token_gap_s=None,
        reached_engine=reached_engine,
    )


async def _until(condition, within_s: float = 10, what: str = "the condition") -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _spilled(tmp_path) -> list:
    return sorted((tmp_path / "spill" / "default").glob("*.jsonl"))


def test_the_ingress_sends_the_rows_of_an_interval_in_one_call_outside_any_request(tmp_path):
    async def scenario():
        ledger = _Ledger()
        client = LedgerClient(ledger, _settings(tmp_path, flush_interval_s=0.05))
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
        ("totals", (None, None, None, None, ("key", "model"), None), "c"),
        ("add", ["d"], None),  # and before the replica stops
    ]


def test_held_rows_sent_for_the_totals_are_stored_even_if_the_admin_client_leaves(tmp_path):
    async def scenario():
        ledger = _Ledger(hold_replies=True)
        client = LedgerClient(ledger, _settings(tmp_path, flush_interval_s=60))
        client.record(_finished("a"))
        asking = asyncio.create_task(client.totals(None, None, None, None))
        await asyncio.wait_for(ledger.called.wait(), 5)  # the held rows' call is made, its reply held
        assert not asking.done()
        asking.cancel()
        await asyncio.gather(asking, return_exceptions=True)
        assert not ledger.replies[0].cancelled()
        ledger.replies[0].set_result(None)  # the ledger answers after all
        await client.close()  # nothing left to store: the rows went with the totals' call
        return ledger, client

    ledger, client = asyncio.run(scenario())
    assert ledger.sent() == [("add", ["a"], None)]
    assert client.pending == 0 and _spilled(tmp_path) == []


def test_a_batch_is_sent_again_until_the_ledger_acknowledges_it(tmp_path, caplog):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")

    async def scenario():
        ledger, metrics = _Ledger(store), _Metrics()
        ledger.failing = 3
        client = LedgerClient(ledger, _settings(tmp_path), metrics)
        for index in range(5):
            client.record(_finished(f"r{index}"))
        await _until(lambda: store.count() == 5, what="the rows to be stored")
        await _until(lambda: client.pending == 0, what="nothing to wait")
        await client.close()
        return ledger, metrics

    ledger, metrics = asyncio.run(scenario())
    assert ledger.added() == [[f"r{index}" for index in range(5)]] * 4  # three failed, the fourth stored
    assert metrics.failures == 3 and metrics.pending == 0 and metrics.dropped == 0
    assert sorted(row.request_id for row in store.rows()) == [f"r{index}" for index in range(5)]
    assert (
        "storing rows failed (RuntimeError: ActorDiedError: the usage-ledger replica died); 5 rows wait" in caplog.text
    )
    assert "rows are stored again, after 3 failed attempts" in caplog.text
    assert _spilled(tmp_path) == []


def test_a_batch_stored_whose_reply_was_lost_is_sent_again_and_counted_once(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")

    async def scenario():
        ledger = _Ledger(store)
        ledger.unanswered = 2
        client = LedgerClient(ledger, _settings(tmp_path), _Metrics())
        for index in range(4):
            client.record(_finished(f"r{index}"))
        await _until(lambda: len(ledger.added()) == 3 and client.pending == 0, what="the third call")
        await client.close()
        return ledger

    ledger = asyncio.run(scenario())
    assert len(ledger.added()) == 3
    assert store.count() == 4
    assert store.totals(None, None)[0]["requests"] == 4


def test_rows_wait_on_disk_while_the_ledger_fails_and_a_new_client_replays_them(tmp_path, caplog):
    """A replica stopping while the ledger is down leaves its rows on disk; the replica that
    replaces it, on that node, sends them, oldest first, before its own."""
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")

    async def first():
        ledger, metrics = _Ledger(store), _Metrics()
        ledger.down = True
        client = LedgerClient(ledger, _settings(tmp_path), metrics)
        for index in range(3):  # three intervals' worth
            client.record(_finished(f"old{index}"))
            await asyncio.sleep(0.05)
        await _until(lambda: client.pending == 3 and not client._queue, what="the rows to go to disk")
        assert metrics.pending == 3
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started < 1  # the ledger fails: rows go to disk, no waiting
        return ledger

    down = asyncio.run(first())
    assert store.count() == 0 and down.added() and _spilled(tmp_path)
    assert "stopping with 3 rows not yet stored, left in" in caplog.text
    lines = [line for path in _spilled(tmp_path) for line in path.read_text().splitlines()]
    on_disk = [UsageRow.from_json(json.loads(line)) for line in lines]
    assert [row.request_id for row in on_disk] == ["old0", "old1", "old2"]

    async def second():
        ledger, metrics = _Ledger(store), _Metrics()
        client = LedgerClient(ledger, _settings(tmp_path), metrics)
        client.record(_finished("new"))
        await _until(lambda: store.count() == 4 and client.pending == 0, what="the replay")
        await client.close()
        return ledger, metrics

    ledger, metrics = asyncio.run(second())
    assert ledger.added() == [["old0", "old1", "old2"], ["new"]]
    assert {row.request_id: row.id for row in store.rows()} == {row.request_id: row.id for row in on_disk} | {
        "new": store.rows()[-1].id
    }
    assert metrics.pending == 0 and _spilled(tmp_path) == [] and list((tmp_path / "spill" / "default").iterdir()) == []
    assert "rows of a stopped replica found in" in caplog.text


def test_a_running_client_adopts_the_rows_of_a_replica_that_crashed(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")

    async def scenario():
        survivor_ledger = _Ledger(store)
        survivor = LedgerClient(survivor_ledger, _settings(tmp_path), _Metrics())
        dead_ledger = _Ledger(store)
        dead_ledger.down = True
        dying = LedgerClient(dead_ledger, _settings(tmp_path), _Metrics())
        for index in range(4):
            dying.record(_finished(f"r{index}"))
        await _until(lambda: dying._spill.rows == 4, what="the rows to go to disk")
        # The process dies: its task stops and the kernel drops its lock; nothing is closed.
        dying._sender.cancel()
        dying._spill._lock.close()
        await _until(lambda: store.count() == 4, what="the survivor to send the dead one's rows")
        await _until(lambda: survivor.pending == 0, what="the survivor to be done")
        await survivor.close()
        return survivor_ledger

    ledger = asyncio.run(scenario())
    assert ledger.added() == [["r0", "r1", "r2", "r3"]]
    assert sorted(row.request_id for row in store.rows()) == ["r0", "r1", "r2", "r3"]
    assert _spilled(tmp_path) == []


def test_past_the_disk_bound_rows_are_dropped_counted_and_logged(tmp_path, caplog):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")

    async def scenario():
        ledger, metrics = _Ledger(store), _Metrics()
        ledger.down = True
        client = LedgerClient(ledger, _settings(tmp_path, spill_max_rows=5, flush_interval_s=60), metrics)
        for index in range(8):
            client.record(_finished(f"r{index}"))
        client.flush()
        await _until(lambda: metrics.dropped == 3, what="the rows past the bound to be dropped")
        assert client.pending == 5 and metrics.pending == 5
        client.record(_finished("later"))
        client.flush()  # the ledger still fails: straight to disk, where there is no room
        assert metrics.dropped == 4
        ledger.down = False
        await _until(lambda: store.count() == 5 and client.pending == 0, what="the kept rows to be stored")
        await client.close()
        return metrics

    metrics = asyncio.run(scenario())
    assert sorted(row.request_id for row in store.rows()) == [f"r{index}" for index in range(5)]  # oldest kept
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(m.startswith("usage ledger: 3 rows dropped, never to be stored") for m in errors)
    assert any(m.startswith("usage ledger: 1 rows dropped") and "spill_max_rows (5)" in m for m in errors)
    assert metrics.dropped == 4


def test_without_a_usable_disk_rows_wait_in_memory_and_are_stored(tmp_path, caplog):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")
    (tmp_path / "a-file").write_text("")

    async def scenario():
        ledger = _Ledger(store)
        ledger.failing = 2
        client = LedgerClient(
            ledger, _settings(tmp_path, spill_directory=str(tmp_path / "a-file" / "spill")), _Metrics()
        )
        for index in range(3):
            client.record(_finished(f"r{index}"))
        await _until(lambda: store.count() == 3 and client.pending == 0, what="the rows to be stored")
        await client.close()

    asyncio.run(scenario())
    assert "cannot keep rows in" in caplog.text


def test_the_spill_reads_back_what_it_wrote_and_reports_torn_lines(tmp_path, caplog):
    def rows(*ids):
        return [UsageRow.of(_finished(request_id)) for request_id in ids]

    spill = Spill(tmp_path / "spill" / "default", max_rows=10)
    assert spill.append(rows("a", "b")) == 0
    [first] = spill.oldest()
    assert spill.append(rows("c")) == 0  # a segment being sent takes no more rows: a new one does
    assert spill.rows == 3 and len(_spilled(tmp_path)) == 2
    assert spill.oldest() == [first, spill.oldest()[1]] and spill.oldest(max_rows=2) == [first]
    read, unreadable = spill.read(first)
    assert [row.request_id for row in read] == ["a", "b"] and unreadable == 0
    spill.remove(first)
    [second] = spill.oldest()
    with second.path.open("a") as file:
        file.write('{"id": "torn", "reque')  # a crash in the middle of a write
    read, unreadable = spill.read(second)
    assert [row.request_id for row in read] == ["c"] and unreadable == 1
    assert "an unreadable row in" in caplog.text
    assert spill.append(rows(*"0123456789")) == 1  # one row waits: room for 9 of these 10
    assert spill.rows == 10
    spill.close()
    other = Spill(tmp_path / "spill" / "default", max_rows=100)
    assert other.adopt() == 11  # the torn line counts until it is read
    assert [row.request_id for row in other.read(other.oldest()[0])[0]] == ["c"]


def test_a_torn_line_on_disk_is_dropped_once_loudly_and_its_segment_still_sent(tmp_path, caplog):
    """A segment left by a process that died mid-write (and whose lock file is gone too)."""
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")
    folder = tmp_path / "spill" / "default"
    folder.mkdir(parents=True)
    good = UsageRow.of(_finished("good"))
    (folder / "999-gone.00000000000000000001.jsonl").write_text(json.dumps(good.to_json()) + '\n{"id": "to')

    async def scenario():
        ledger, metrics = _Ledger(store), _Metrics()
        ledger.failing = 2
        client = LedgerClient(ledger, _settings(tmp_path), metrics)
        await _until(lambda: store.count() == 1 and client.pending == 0, what="the good row to be stored")
        await client.close()
        return ledger, metrics

    ledger, metrics = asyncio.run(scenario())
    assert ledger.added() == [["good"]] * 3
    assert metrics.dropped == 1 and metrics.failures == 2
    assert caplog.text.count("an unreadable row in") == 1
    assert list(folder.iterdir()) == []
