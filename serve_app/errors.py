"""The exception tree for client-visible failures, and the one function that shapes them.

`/llm` clients (the Livepeer SDK and gateway) read `detail.msg`; OpenAI clients read
`error.message`, and Anthropic's SDK reads `error.message` under `"type": "error"` with its own
error types. Every body carries the request id so a user can quote it to an operator.
"""

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from pydantic_core import from_json

Api = Literal["livepeer", "openai", "anthropic"]


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


OBJECT_TYPES = {"dict_type", "model_type", "dataclass_type", "model_attributes_type"}
OBJECT_WANTED = "Input should be an object"
"""What pydantic says there in its own terms, naming the class it wanted (vLLM's, ours)."""
MAX_PROBLEMS = 10
"""A body with thousands of bad items gets a message naming the first few places, not a
message as large as the body."""


def from_validation(error: ValidationError, what: str, sent: bytes) -> BadRequest:
    """One readable sentence per place, named by the path the client wrote in `sent` (the JSON
    validated), instead of pydantic's dump. Pydantic's own path also names each member of a union
    it tried (`str`, `list[TextPart]`, vLLM's TypedDicts, `function-wrap[…]`): those steps are
    not keys or indexes of what was sent, so they are dropped, and what each member wanted at one
    place becomes one problem."""
    items = error.errors(include_url=False)
    for item in items:
        if item["type"] == "json_invalid":
            return BadRequest(f"the {what} is not valid JSON: {item['ctx'].get('error', '')}".rstrip(": "))
    document = from_json(sent)  # it parsed, and was then found wrong
    problems: dict[str, list[str]] = {}
    for item in items:
        where = ".".join(str(step) for step in _client_path(item["loc"], item["type"], document)) or "body"
        message = OBJECT_WANTED if item["type"] in OBJECT_TYPES else item["msg"].removeprefix("Value error, ")
        wanted = problems.setdefault(where, [])
        if message not in wanted:
            wanted.append(message)
    shown = [f"{where}: {' or '.join(wanted)}" for where, wanted in list(problems.items())[:MAX_PROBLEMS]]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"and {len(problems) - MAX_PROBLEMS} more")
    return BadRequest(f"invalid {what}: " + "; ".join(shown))


def _client_path(loc: tuple[int | str, ...], kind: str, document: Any) -> list[int | str]:
    """The steps of `loc` that lead through `document`; a field left out is a last step that does
    not, and is kept."""
    path: list[int | str] = []
    here = document
    for index, step in enumerate(loc):
        within = (isinstance(here, dict) and step in here) or (
            isinstance(here, list) and isinstance(step, int) and 0 <= step < len(here)
        )
        if within:
            here = here[step]
        elif not (kind == "missing" and index == len(loc) - 1):
            continue
        path.append(step)
    return path


def api_of(path: str) -> Api:
    """Which shape a route's errors take: OpenAI's under `/v1/` and `/admin/` (whose clients are
    scripts and SDKs) and on vLLM's tokenization routes, Anthropic's on its Messages API, the
    Livepeer runner's elsewhere."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith(("/v1/", "/admin/", "/tokenize", "/detokenize")) else "livepeer"


ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
"""Anthropic's error types by status (its SDK maps statuses to exceptions, and shows the type):
any other 4xx is an `invalid_request_error`, any other 5xx an `api_error`."""


def anthropic_type(status: int) -> str:
    return ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(api: Api, error: APIError, request_id: str) -> dict[str, Any]:
    """Also the body of an error event inside a stream whose 200 already went out."""
    if api == "livepeer":
        return {"detail": {"msg": error.message, "request_id": request_id}}
    if api == "anthropic":
        return {
            "type": "error",
            "error": {"type": anthropic_type(error.status), "message": error.message},
            "request_id": request_id,
        }
    return {
        "error": {"message": error.message, "type": error.kind, "param": None, "code": error.status},
        "request_id": request_id,
    }


def error_response(api: Api, error: APIError, request_id: str) -> JSONResponse:
    return JSONResponse(error_body(api, error, request_id), status_code=error.status, headers=error.headers)
