"""The exception tree for client-visible failures, and the one function that shapes them.

`/llm` clients (the Livepeer SDK and gateway) read `detail.msg`; OpenAI clients read
`error.message`. Both bodies carry the request id so a user can quote it to an operator.
"""

from typing import TYPE_CHECKING, Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError

if TYPE_CHECKING:
    # Only named here: the rate limiter's and the ledger's replicas import this module and would
    # otherwise load vLLM, seconds of each replica's start.
    from serve_app.protocol import ErrorResponse

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


def from_vllm(error: "ErrorResponse") -> APIError:
    """vLLM's serving layer reports client mistakes (bad parameters, a prompt longer than the
    context) as an ErrorResponse carrying the status it chose."""
    code = error.error.code
    cls = {400: BadRequest, 404: NotFound, 503: Overloaded}.get(code)
    if cls is None:
        err = APIError(error.error.message)
        err.status = code if 400 <= code < 600 else 500
        return err
    return cls(error.error.message)


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


def error_response(api: Api, error: APIError, request_id: str) -> JSONResponse:
    if api == "livepeer":
        body: dict = {"detail": {"msg": error.message, "request_id": request_id}}
    else:
        body = {
            "error": {
                "message": error.message,
                "type": error.kind,
                "param": None,
                "code": error.status,
            },
            "request_id": request_id,
        }
    return JSONResponse(body, status_code=error.status, headers=error.headers)

