"""Server-Sent Events: the framing of `data: …` lines and the closing `[DONE]` of the OpenAI-style
APIs (the named events of Anthropic's API and of Responses come framed by vLLM, and end without
it), and the streaming response that ends its request's lifecycle when the stream ends.

The stream's events are written by the API's own generator, which owns its failure mode: once
the 200 has gone out an error can only be told inside the stream, so the generator ends the
stream well-formed and reports the failure in the request's `Answer`. Its request is finished
after `[DONE]` has gone out, so the client's answer never waits for logs, metrics, the rate
limiter or the ledger.
"""

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from serve_app.http.lifecycle import RequestLifecycle

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"
"""An SSE comment: every SSE client skips it, the Livepeer gateway included (it reads `data:` lines)."""
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""One encoder for every event: `json.dumps` with options builds a new one per call, per token."""


def event(payload: dict[str, Any]) -> str:
    return f"data: {_encode(payload)}\n\n"


class EventStream(StreamingResponse):
    """Starlette never closes a body it did not finish, and never starts one whose client left
    first: the events are closed here, the model's work cancelled, and the request finished with
    the status its answer reports (a client that left before the end: 499)."""

    def __init__(
        self,
        events: AsyncGenerator[str, None],
        cancel: Callable[[], None],
        lifecycle: RequestLifecycle,
        headers: dict[str, str],
        done: str | None = DONE,
    ) -> None:
        """`done`: the stream's last event, OpenAI's `[DONE]` unless the API has none (Anthropic's
        ends with its `message_stop` event)."""
        super().__init__(_ended(events, lifecycle, done), media_type="text/event-stream", headers=HEADERS | headers)
        self._events = events
        self._cancel = cancel
        self._lifecycle = lifecycle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A departed client leaves the events suspended: close them first, so that their
            # cleanup runs before the request is recorded; the model's work is cancelled and the
            # request finished even if closing them fails.
            try:
                await self.body_iterator.aclose()
                await self._events.aclose()
            finally:
                try:
                    self._cancel()
                finally:
                    self._lifecycle.finish(self._lifecycle.answer.stream_status())


async def _ended(
    events: AsyncGenerator[str, None], lifecycle: RequestLifecycle, done: str | None
) -> AsyncIterator[str]:
    async for item in events:
        yield item
    lifecycle.answer.complete = True
    if done is not None:
        yield done
