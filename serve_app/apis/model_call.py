"""A request's trip to its model and back, the same for every API: the key's lease from the
rate limiter, the model's first output read before any byte goes out (so that errors found there
become real HTTP statuses), then the rest of a stream as parsed chunks.

A stream whose first output is slow to come (a model starting from zero replicas, a full queue)
does not wait in silence: past `ingress.stream_keepalive_s` its 200 goes out and the stream sends
SSE comments until the output comes, since proxies and load balancers cut a connection idle for
long (60 s is common). A failure then is told inside the stream, as any later one is."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from serve_app.apis.request_policy import completions_asked, generates, prompt_token_bound, reserved_tokens
from serve_app.errors import APIError, BadRequest, EngineFailure, Overloaded, for_status
from serve_app.http.lifecycle import RequestLifecycle
from serve_app.models.outputs import ModelError, WholeAnswer
from serve_app.models.requests import EngineRequest
from serve_app.routing.router import ModelStream, Route
from serve_app.telemetry.record import Answer
from serve_app.tenancy.budgets import Ask
from serve_app.tenancy.keys import Caller
from serve_app.tenancy.limiter import LimitGate

logger = logging.getLogger("ray.serve")


@dataclass
class ModelCall:
    first: WholeAnswer | str | None
    """A whole answer, or a stream's first chunk; None while `pending`."""
    rest: ModelStream | None
    headers: dict[str, str]
    """The key's `x-ratelimit-*` headers."""
    pending: "asyncio.Task[tuple[WholeAnswer | str, ModelStream]] | None" = None
    """A stream's first output, still awaited after the keep-alive delay."""
    keepalive_s: float = 0.0
    request_id: str = ""
    """For the log line of a failure the model tells midway."""

    async def keepalives(self) -> AsyncIterator[None]:
        """At once (the call has waited `keepalive_s` already), then once per `keepalive_s`, until
        the first output is in (then `first` and `rest` are set); raises what getting it raised,
        an `APIError` for the stream to end with."""
        while self.pending is not None:
            if not self.pending.done():
                yield None
                await asyncio.wait({self.pending}, timeout=self.keepalive_s)
                continue
            task, self.pending = self.pending, None
            self.first, self.rest = task.result()

    def cancel(self) -> None:
        """The model's work, however far it got: a first output that came after the client left
        still has a stream to cancel."""
        pending = self.pending
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            self.first, self.rest = pending.result()
            self.pending = None
        if self.pending is not None:
            self.pending.cancel()
        elif self.rest is not None:
            self.rest.cancel()


class ModelCalls:
    def __init__(self, gate: LimitGate, stream_keepalive_s: float | None = None) -> None:
        self._gate = gate
        self._keepalive_s = stream_keepalive_s

    async def start(
        self, route: Route, request: EngineRequest, caller: Caller, lifecycle: RequestLifecycle
    ) -> ModelCall:
        """From here on the request counts: its lease is released when it ends, however it ends."""
        reserved = reserved_tokens(request) or _unbounded_reservation(route, request, caller)
        prompt_bound = prompt_token_bound(request)
        spend = 0.0 if route.price is None else route.price.cost(prompt_bound, reserved)
        lease = await self._gate.admit(caller, reserved, Ask(reserved + prompt_bound, spend))
        if lease is not None:
            lifecycle.soft_budgets = tuple(lease.decision.soft_passed)
            lifecycle.on_finish(lambda done: self._gate.release(lease, Ask(done.total_tokens, done.cost or 0.0)))
        headers = lease.decision.headers if lease is not None else {}
        if not getattr(request, "stream", False) or self._keepalive_s is None:
            first, rest = await _first_output(route, request, lifecycle)
            return ModelCall(first, rest, headers, request_id=lifecycle.request_id)
        waiting = asyncio.ensure_future(_first_output(route, request, lifecycle))
        try:
            first, rest = await asyncio.wait_for(asyncio.shield(waiting), self._keepalive_s)
        except TimeoutError:
            return ModelCall(
                None, None, headers, pending=waiting, keepalive_s=self._keepalive_s, request_id=lifecycle.request_id
            )
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        return ModelCall(first, rest, headers, request_id=lifecycle.request_id)


def _unbounded_reservation(route: Route, request: EngineRequest, caller: Caller) -> int:
    """What a request that sets no `max_tokens` (and meets no server cap) must reserve against its
    key's or tenant's token limits: it may generate up to the model's context, so it reserves that
    for each choice; otherwise a budget would be overrun by what it had not reserved."""
    counting = [subject for subject in caller.subjects() if subject.limits.counts_tokens]
    if not counting or not generates(request):
        return 0  # requests and concurrency limits count requests, not tokens
    if route.max_model_len is None:
        raise BadRequest(
            f"set max_tokens: {counting[0].label} has token limits, and the most model "
            f"{route.model_id!r} can generate is not known to this server (its engine.max_model_len is not set)"
        )
    return route.max_model_len * completions_asked(request)


async def _first_output(
    route: Route, request: EngineRequest, lifecycle: RequestLifecycle
) -> tuple[WholeAnswer | str, ModelStream]:
    """The wait is bounded (a model at zero replicas starts one meanwhile); a cancelled request
    (the client left) cancels the model's work."""
    outputs = route.call(request)
    try:
        first = await asyncio.wait_for(outputs.__anext__(), route.first_output_timeout_s)
    except TimeoutError:
        outputs.cancel()
        raise Overloaded(
            f"model {route.model_id!r} gave no output within {route.first_output_timeout_s:g} s "
            "(it may be starting from zero replicas); retry shortly",
            retry_after_s=5,
        ) from None
    except asyncio.CancelledError:
        outputs.cancel()
        # Sent, and perhaps begun: the ledger records it, with the tokens known (none).
        lifecycle.reached_engine = True
        raise
    except BackPressureError:
        raise Overloaded(f"model {route.model_id!r} is at capacity; retry shortly") from None
    except RayActorError:
        # The replica's process or node was lost with the request on it, which may have begun
        # there: the ledger records it, failed. Serve sends the retry to a live replica.
        logger.exception("model %r lost the replica serving request id %s", route.model_id, lifecycle.request_id)
        outputs.cancel()  # an actor only unreachable for a while may still be working on it
        lifecycle.reached_engine = True
        raise Overloaded(
            f"model {route.model_id!r} lost the replica serving this request; retry shortly "
            f"(request id {lifecycle.request_id})"
        ) from None
    except Exception:
        logger.exception("model call failed (request id %s)", lifecycle.request_id)
        outputs.cancel()
        lifecycle.reached_engine = True  # and failed there: the ledger records it, failed
        raise EngineFailure(f"the model engine failed (request id {lifecycle.request_id})") from None
    lifecycle.reached_engine = True
    if isinstance(first, ModelError):
        outputs.cancel()
        raise told(first, lifecycle.request_id)
    return first, outputs


def told(error: ModelError, request_id: str, midway: bool = False) -> APIError:
    """What the client is told of an error the model reported: vLLM's own words for the client's
    mistakes and its refusals (a prompt too long, its queue full), which are meant for callers;
    for its own failure (a crash: a 500) a fixed sentence, its words going to the log with the
    request id, since they speak of vLLM's insides ("EngineCore encountered an issue. See stack
    trace..."); a dead engine's the model's runner has made a 503 to retry. Midway, the stream's
    own end tells the request id."""
    if error.status < 500 or error.status == 503:
        return for_status(error.status, error.message)
    logger.error("the model failed (request id %s): %s", request_id, error.message)
    return EngineFailure(
        "the model engine failed mid-stream" if midway else f"the model engine failed (request id {request_id})"
    )


async def payloads(call: ModelCall) -> AsyncIterator[str]:
    """A stream's payloads as the model gave them, its first one included; an error the model
    tells midway is raised as an `APIError`, for the API's stream to end with."""
    item = call.first
    rest = aiter(call.rest)
    while True:
        if isinstance(item, ModelError):
            raise told(item, call.request_id, midway=True)
        yield item
        try:
            item = await anext(rest)
        except StopAsyncIteration:
            return


async def chunks(call: ModelCall, answer: Answer) -> AsyncIterator[dict[str, Any]]:
    """A stream's OpenAI chunks, parsed once for either API that speaks them; their usage and
    finish reason go to the answer, and a chunk of new output (text, reasoning, tool calls)
    counts as a token. An error the model tells midway, or a stream that stops without a finish
    reason, is raised as an `APIError`, for the API's stream to end with."""
    async for payload in payloads(call):
        chunk = json.loads(payload)
        answer.usage(chunk.get("usage"))
        choices = chunk.get("choices")
        if choices:
            delta = choices[0].get("delta") or {}
            if choices[0].get("text") or delta.get("content") or delta.get("reasoning") or delta.get("tool_calls"):
                answer.token()
            answer.finish_reason = choices[0].get("finish_reason") or answer.finish_reason
        yield chunk
    if answer.finish_reason is None:
        raise EngineFailure("the model stopped without finishing")
