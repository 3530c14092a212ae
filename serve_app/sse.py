"""The only writer of Server-Sent Events: `data: …` lines and the closing `[DONE]`, for both APIs.

Each stream owns its failure mode: once the 200 has gone out, an error can only be told inside
the stream, so each generator catches it, ends the stream well-formed, and always closes its
upstream so a departed client stops the engine's work on the request. `closed` sends `[DONE]`
before the request's record is written, so the client's answer never waits for logs, metrics,
the rate limiter or the ledger.
"""

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from serve_app import livepeer
from serve_app.request_log import CLIENT_CLOSED_REQUEST, RequestRecord

logger = logging.getLogger("ray.serve")

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: str) -> str:
    return f"data: {payload}\n\n"


async def livepeer_events(
    first: str, rest: AsyncIterator[str], record: RequestRecord
) -> AsyncGenerator[str, None]:
    state = livepeer.StreamState()
    try:
        async for payload in _chain(first, rest):
            for chunk in livepeer.stream_chunks(json.loads(payload), state):
                record.token_seen()
                yield event(json.dumps(chunk))
        if state.finish_reason is None:
            yield event(json.dumps(livepeer.failure_chunk(state, "the model stopped without finishing")))
    except (asyncio.CancelledError, GeneratorExit):
        record.status = CLIENT_CLOSED_REQUEST
        raise
    except Exception:
        logger.exception("stream failed (request id %s)", record.request_id)
        message = f"the model engine failed mid-stream (request id {record.request_id})"
        yield event(json.dumps(livepeer.failure_chunk(state, message)))
    finally:
        rest.cancel()
        record.set_usage(state.usage)
        record.finish_reason = state.finish_reason


async def openai_events(
    first: str,
    rest: AsyncIterator[str],
    record: RequestRecord,
    client_wants_usage: bool,
    client_wants_usage_per_chunk: bool,
) -> AsyncGenerator[str, None]:
    """Passes vLLM's chunks through, less the usage we always ask vLLM for (on every chunk, so
    that the request log and the ledger count even an abandoned stream's tokens) and forward only
    as far as the client asked: per chunk, in the final usage-only chunk, or not at all."""
    try:
        async for payload in _chain(first, rest):
            chunk = json.loads(payload)
            usage = chunk.get("usage")
            if usage:
                record.set_usage(usage)
            choices = chunk.get("choices")
            if choices:
                record.token_seen()
                record.finish_reason = choices[0].get("finish_reason") or record.finish_reason
                if usage and not client_wants_usage_per_chunk:
                    del chunk["usage"]
                    payload = json.dumps(chunk, separators=(",", ":"))
            elif "error" in chunk:
                record.status = chunk["error"].get("code") or 500
            elif usage and not client_wants_usage:
                continue
            yield event(payload)
    except (asyncio.CancelledError, GeneratorExit):
        record.status = CLIENT_CLOSED_REQUEST
        raise
    except Exception:
        logger.exception("stream failed (request id %s)", record.request_id)
        record.status = 500
        message = f"the model engine failed mid-stream (request id {record.request_id})"
        yield event(json.dumps({"error": {"message": message, "type": "internal_error", "code": 500}}))
    finally:
        rest.cancel()


async def closed(events: AsyncGenerator[str, None], record: RequestRecord) -> AsyncIterator[str]:
    try:
        async for item in events:
            yield item
        yield DONE
    finally:
        # A departed client leaves `events` suspended: close it first, so that the record is
        # written with its 499 and the engine's work is cancelled.
        await events.aclose()
        record.finish()


async def _chain(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for item in rest:
        yield item
