"""The usage ledger on the real engine and model, through the shipped config's admin key."""

import time

import pytest

from tests.polling import until
from tests.sse import json_chunks

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_ledger_matches_the_usage_the_real_model_reported(client):
    since = time.time()
    whole = client.post("/llm", json={"messages": FRANCE, "max_tokens": 8})
    streamed = client.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": FRANCE,
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    told = [whole.json()["usage"], json_chunks(streamed.text)[-1]["usage"]]
    assert all(usage["completion_tokens"] > 0 for usage in told)

    def ledger() -> dict | None:
        rows = client.get("/admin/usage", params={"since": since, "key": "local"}).json()["data"]
        return rows[0] if rows and rows[0]["requests"] == 2 else None

    row = until(ledger, 15, "the ledger to record both requests")
    assert row["model"] == "smollm2-135m-instruct" and row["failed_requests"] == 0
    assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in told)
    assert row["completion_tokens"] == sum(u["completion_tokens"] for u in told)
