"""The exception tree for client-visible failures, and the one function that shapes them.

`/llm` clients (the Livepeer SDK and gateway) read `detail.msg`; OpenAI clients read
`error.message`. Both bodies carry the request id so a user can quote it to an operator.
"""

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError

Api = Literal["livepeer", "openai"]


class APIError(Exception):
    status: int = 500
    kind: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    kind = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(APIError):
    status = 403
    kind = "permission_error"


class NotFound(APIError):
    status = 404
    kind = "not_found_error"


class Conflict(APIError):
    status = 409
    kind = "conflict_error"


class BodyTooLarge(APIError):
    status = 413
    kind = "invalid_request_error"


class Overloaded(APIError):
    status = 503
    kind = "overloaded_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class RateLimited(APIError):
    status = 429
    kind = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers | {"Retry-After": str(int(retry_after_s))})


class EngineFailure(APIError):
    status = 500
    kind = "internal_error"


def for_status(status: int, message: str) -> APIError:
    """The error for a status another layer chose: vLLM's serving layer reports client mistakes
    (bad parameters, a prompt longer than the context) and refusals with the status its own
    server would answer; FastAPI answers unknown paths and methods with theirs."""
    cls = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 503: Overloaded}.get(
        status
    )
    if cls is not None:
        return cls(message)
    error = BadRequest(message) if 400 <= status < 500 else APIError(message)
    error.status = status if 400 <= status < 600 else 500
    return error


def from_validation(error: ValidationError, what: str) -> BadRequest:
    """One readable sentence per problem, naming the field, instead of pydantic's dump."""
    problems = []
    for item in error.errors(include_url=False):
        if item["type"] == "json_invalid":
            return BadRequest(f"the {what} is not valid JSON: {item['ctx'].get('error', '')}".rstrip(": "))
        where = ".".join(str(part) for part in item["loc"]) or "body"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return BadRequest(f"invalid {what}: " + "; ".join(problems))


def api_of(path: str) -> Api:
    """Which shape a route's errors take: OpenAI's under `/v1/` and `/admin/` (whose clients are
    scripts and SDKs), the Livepeer runner's elsewhere."""
    return "openai" if path.startswith(("/v1/", "/admin/")) else "livepeer"


def error_body(api: Api, error: APIError, request_id: str) -> dict[str, Any]:
    """Also the body of an error event inside an OpenAI stream whose 200 already went out."""
    if api == "livepeer":
        return {"detail": {"msg": error.message, "request_id": request_id}}
    return {
        "error": {"message": error.message, "type": error.kind, "param": None, "code": error.status},
        "request_id": request_id,
    }


def error_response(api: Api, error: APIError, request_id: str) -> JSONResponse:
    return JSONResponse(error_body(api, error, request_id), status_code=error.status, headers=error.headers)
