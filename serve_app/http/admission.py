"""Every route's way in and out: the request is named and its lifecycle opened, its token and the
route's scope checked and its body's size bounded before the body is read, then its handler runs;
whatever the handler returns or raises, and a cancellation too, ends the lifecycle exactly once."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from cluster.schema import Scope
from cluster.schema.serving import MAX_BODY_BYTES
from serve_app.errors import APIError, api_of, error_response, for_status
from serve_app.http.body_limit import bound_body
from serve_app.http.handlers import request_id_of
from serve_app.http.lifecycle import Listeners, RequestLifecycle
from serve_app.http.streaming import EventStream
from serve_app.telemetry.record import CLIENT_CLOSED_REQUEST
from serve_app.tenancy.keys import Caller, KeyRing

logger = logging.getLogger("ray.serve")


def credentials(request: Request, endpoint: str) -> str | None:
    """Anthropic's SDK sends its key as `x-api-key`: on the Messages API that header stands for
    `Authorization: Bearer <key>` where that one is absent."""
    authorization = request.headers.get("authorization")
    api_key = request.headers.get("x-api-key")
    if authorization is None and api_key and api_of(endpoint) == "anthropic":
        return f"Bearer {api_key}"
    return authorization


Handler = Callable[[Request, Caller, RequestLifecycle], Awaitable[Response | dict[str, Any]]]
"""A route's logic: a response, or a body to answer as JSON."""


class Admission:
    def __init__(self, keys: KeyRing, listeners: Listeners, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._keys = keys
        self._listeners = listeners
        self._max_body_bytes = max_body_bytes

    async def serve(self, request: Request, endpoint: str, scope: Scope | None, handler: Handler) -> Response:
        """A stream's lifecycle is ended by the stream, when it ends; every other answer's here."""
        lifecycle = RequestLifecycle(request_id_of(request), endpoint, self._listeners)
        try:
            caller = self._keys.authenticate(credentials(request, endpoint))
            lifecycle.key_name, lifecycle.tenant = caller.key_name, caller.tenant_name
            if scope is not None:
                caller.require(scope)
            bound_body(request, self._max_body_bytes)
            response = await handler(request, caller, lifecycle)
            if not isinstance(response, Response):
                response = JSONResponse(response)
        except asyncio.CancelledError:
            lifecycle.finish(CLIENT_CLOSED_REQUEST)
            raise
        except ClientDisconnect:
            # The client left while its body was being read: nothing to answer, nothing failed.
            lifecycle.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except HTTPException as error:
            api_error = for_status(error.status_code, str(error.detail))
            lifecycle.finish(api_error.status)
            return error_response(api_of(endpoint), api_error, lifecycle.request_id)
        except APIError as error:
            lifecycle.finish(error.status)
            return error_response(api_of(endpoint), error, lifecycle.request_id)
        except Exception:
            logger.exception("unhandled error on %s (request id %s)", endpoint, lifecycle.request_id)
            lifecycle.finish(500)
            error = APIError(f"internal error (request id {lifecycle.request_id})")
            return error_response(api_of(endpoint), error, lifecycle.request_id)
        if not isinstance(response, EventStream):
            lifecycle.finish(response.status_code)
        return response
