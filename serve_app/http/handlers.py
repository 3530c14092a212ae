"""The answers of requests that no route's lifecycle handled: FastAPI's own (no such path, a
method the path does not take) and, as a last resort, a bug outside any route. Routes shape their
own errors (`serve_app.http.admission`), so that each is recorded once with its request."""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve_app.errors import APIError, api_of, error_response, for_status

logger = logging.getLogger("ray.serve")


def request_id_of(request: Request) -> str:
    """Serve's proxy keeps a client's x-request-id (or makes one), puts it in the request's
    headers and returns it on the response."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def install(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _framework_error)
    app.add_exception_handler(Exception, _unexpected)


async def _framework_error(request: Request, error: HTTPException) -> JSONResponse:
    """In the endpoint's shape too, instead of `{"detail": "Not Found"}`."""
    api_error = for_status(error.status_code, f"{request.method} {request.url.path}: {error.detail}")
    api_error.headers |= dict(error.headers or {})
    return error_response(api_of(_path(request)), api_error, request_id_of(request))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """Still in the endpoint's shape and never with a traceback. Not logged here: Starlette
    raises the error on after this answer, and Serve logs it."""
    request_id = request_id_of(request)
    return error_response(api_of(_path(request)), APIError(f"internal error (request id {request_id})"), request_id)


def _path(request: Request) -> str:
    return request.url.path.removeprefix(request.scope.get("root_path", ""))
