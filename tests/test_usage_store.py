"""The ledger's store on a real SQLite file: rows once, totals by key and model over a range."""

import sqlite3
import uuid

from serve_app.usage import UsageRow, UsageStore


def _row(key: str, model: str, at: float, prompt: int, completion: int, status: int = 200) -> UsageRow:
    return UsageRow(id=uuid.uuid4().hex, request_id="r", time=at, key=key, model=model, endpoint="/llm",
                    prompt_tokens=prompt, completion_tokens=completion, finish_reason="stop", status=status,
                    latency_ms=1.0)


def test_totals_per_key_and_model_over_a_range(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/ledger/usage.sqlite")
    rows = [_row("a", "m1", 100, 3, 4), _row("a", "m1", 150, 5, 6, status=499), _row("a", "m2", 160, 1, 1),
            _row("b", "m1", 170, 7, 8), _row("a", "m1", 300, 100, 100)]
    for row in rows:
        store.add(row)
    store.add(rows[0])  # a retried call: still one row
    totals = store.totals(since=100, until=300)
    assert totals == [
        {"key": "a", "model": "m1", "requests": 2, "failed_requests": 1, "prompt_tokens": 8,
         "completion_tokens": 10, "total_tokens": 18},
        {"key": "a", "model": "m2", "requests": 1, "failed_requests": 0, "prompt_tokens": 1,
         "completion_tokens": 1, "total_tokens": 2},
        {"key": "b", "model": "m1", "requests": 1, "failed_requests": 0, "prompt_tokens": 7,
         "completion_tokens": 8, "total_tokens": 15},
    ]
    assert [t["requests"] for t in store.totals(None, None, key="a", model="m1")] == [3]


def test_rows_are_in_a_plain_sqlite_file_that_a_new_store_reads(tmp_path):
    url = f"sqlite:///{tmp_path}/usage.sqlite"
    UsageStore(url).add(_row("a", "m", 1, 2, 3))
    assert UsageStore(url).totals(None, None)[0]["total_tokens"] == 5
    with sqlite3.connect(tmp_path / "usage.sqlite") as db:
        assert db.execute("select key, prompt_tokens, completion_tokens from usage").fetchall() == [("a", 2, 3)]
