"""A client that leaves stops the engine's work on its request, streaming or not.

The requests below would keep the real engine busy for tens of seconds (2,000 tokens with
`ignore_eos`); the engine's own count of unfinished requests shows when it lets them go.
"""

import asyncio
import secrets
import time

import httpx
import pytest
from ray import serve

from cluster.schema import deployment_name
from tests.conftest import API_KEY
from tests.serve_logs import log_line

pytestmark = pytest.mark.e2e

LONG = {
    "model": "smollm2-135m-instruct",
    "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}],
    "max_tokens": 2000,
    "ignore_eos": True,
}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


async def _unfinished() -> int:
    handle = serve.get_deployment_handle(deployment_name("smollm2-135m-instruct"), app_name="llm")
    return await handle.num_unfinished_requests.remote()


async def _until(condition, timeout_s: float) -> None:
    """Polls the engine's state until `condition` holds; fails at the deadline."""
    started = time.monotonic()
    while not condition(await _unfinished()):
        assert time.monotonic() - started < timeout_s, "the engine did not reach the expected state in time"
        await asyncio.sleep(0.05)


async def test_closing_a_stream_aborts_the_engine_request(llm_url):
    await _until(lambda n: n == 0, 30)
    headers = HEADERS | {"x-request-id": "abort-" + secrets.token_hex(6)}
    async with httpx.AsyncClient(base_url=llm_url, headers=headers, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=LONG | {"stream": True}) as response:
            assert response.status_code == 200
            received = 0
            async for line in response.aiter_lines():
                received += line.startswith("data: ")
                if received == 5:
                    # Checked before leaving the loop: leaving it closes the line iterator, and
                    # with it the connection.
                    assert await _unfinished() == 1
                    break
    await _until(lambda n: n == 0, 10)
    assert "status=499" in log_line(headers["x-request-id"])


async def test_leaving_a_non_streaming_request_aborts_it(llm_url):
    await _until(lambda n: n == 0, 30)
    headers = HEADERS | {"x-request-id": "abort-" + secrets.token_hex(6)}
    async with httpx.AsyncClient(base_url=llm_url, headers=headers, timeout=60) as client:
        request = asyncio.create_task(client.post("/v1/chat/completions", json=LONG))
        await _until(lambda n: n == 1, 30)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await _until(lambda n: n == 0, 10)
    assert "status=499" in log_line(headers["x-request-id"])
