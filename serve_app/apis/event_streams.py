"""Streams of named SSE events (Anthropic's Messages API, OpenAI's Responses API), passed on as
vLLM framed them (`event: …` and `data: …`): each API reads the events it needs on the way, for
the request's usage, output and stop reason, and a failure after the 200 went out ends the
stream with an `error` event in the API's error shape, which its SDK raises."""

import json
import logging
from collections.abc import AsyncGenerator, Callable

from serve_app.apis.model_call import ModelCall, payloads
from serve_app.errors import Api, APIError, EngineFailure, error_body
from serve_app.http.streaming import KEEPALIVE
from serve_app.telemetry.record import Answer

logger = logging.getLogger("ray.serve")

EventReader = Callable[[str, str, Answer], None]
"""An API's reading of one event (its name, its data's JSON text) into the request's answer;
it may raise an `APIError` for an event that tells a failure."""


async def named_events(
    call: ModelCall, answer: Answer, request_id: str, read: EventReader, api: Api
) -> AsyncGenerator[str, None]:
    try:
        async for _ in call.keepalives():
            yield KEEPALIVE
        async for frame in payloads(call):
            name, _, data = frame.partition("\ndata: ")
            read(name.removeprefix("event: "), data, answer)
            yield frame + "\n\n"
        if answer.finish_reason is None:
            raise EngineFailure("the model stopped without finishing")
    except APIError as error:
        answer.fail(error.status)
        yield error_event(api, error, request_id)
    except Exception:
        logger.exception("stream failed (request id %s)", request_id)
        answer.fail(500)
        yield error_event(
            api, EngineFailure(f"the model engine failed mid-stream (request id {request_id})"), request_id
        )


def error_event(api: Api, error: APIError, request_id: str) -> str:
    return f"event: error\ndata: {json.dumps(error_body(api, error, request_id))}\n\n"
