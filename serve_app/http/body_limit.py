"""A bound on a request body's size, held before the body is parsed: a declared length over it is
refused before a byte is read, and a body sent in chunks (or longer than it declared) as soon as
what has arrived passes it, so that no reader of a body holds more than the bound and one message.

Serve's proxy takes in what the client sends until the answer goes out: the early 413 keeps that
short too.
"""

from starlette.requests import Request
from starlette.types import Message

from serve_app.errors import BodyTooLarge


def bound_body(request: Request, max_bytes: int) -> None:
    """Raises at once for a declared length over `max_bytes`; otherwise the request's reads raise
    when the body passes it. The reads are the request's own `receive`, which every reader of its
    body (`body()`, `json()`, `stream()`) goes through; Starlette has no public way to replace it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    receive = request.receive
    received = 0

    async def bounded() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _too_large(max_bytes)
        return message

    request._receive = bounded


def _too_large(max_bytes: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is over this server's limit of {max_bytes:,} bytes")
