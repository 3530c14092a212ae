"""OpenAI-compatible wire models: vLLM's own, re-exported, and the checks our server adds to
vLLM's chat request before a key's budget is touched."""

from pydantic import ValidationError
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.exceptions import VLLMClientError

from serve_app.errors import BadRequest, from_validation

__all__ = ["ChatCompletionRequest", "ChatCompletionResponse", "StreamOptions", "parse_chat"]

KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def parse_chat(body: bytes) -> ChatCompletionRequest:
    """vLLM's request model raises its own error for checks across fields (stream_options
    without stream, an empty tools list); pydantic does not wrap it."""
    try:
        chat = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise from_validation(error, "request body") from None
    except VLLMClientError as error:
        raise BadRequest(f"invalid request body: {error}") from None
    _check(chat)
    return chat


def _check(chat: ChatCompletionRequest) -> None:
    """vLLM's model accepts custom roles, an empty list of messages, and counts below 1 (its
    sampling parameters refuse those later, after a negative reservation against the key's
    tokens-per-minute budget would have let other requests through)."""
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = getattr(chat, name)
        if value is not None and value < 1:
            raise BadRequest(f"invalid request body: {name}: must be at least 1, not {value}")
    if not chat.messages:
        raise BadRequest("invalid request body: messages: must hold at least one message")
    for index, message in enumerate(chat.messages):
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        if role not in KNOWN_ROLES:
            raise BadRequest(
                f"invalid request body: messages.{index}.role: {role!r} is not one of {', '.join(sorted(KNOWN_ROLES))}"
            )
