"""A request body read as JSON and validated into an API's wire model, each failure a 400 whose
message names the client's own path to the fault."""

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from vllm.exceptions import VLLMClientError

from serve_app.errors import BadRequest, from_validation

M = TypeVar("M", bound=BaseModel)


def json_object(body: bytes) -> dict[str, Any]:
    """JSON's grammar has no NaN or Infinity."""
    try:
        document = from_json(body, allow_inf_nan=False)
    except ValueError as error:
        raise BadRequest(f"the request body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadRequest("invalid request body: body: must be a JSON object")
    return document


def validated(model: type[M], document: dict[str, Any], body: bytes) -> M:
    """vLLM's models raise their own error for checks across fields (stream_options without
    stream, an empty tools list); pydantic does not wrap it."""
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise from_validation(error, "request body", body) from None
    except VLLMClientError as error:
        raise BadRequest(f"invalid request body: {error}") from None
