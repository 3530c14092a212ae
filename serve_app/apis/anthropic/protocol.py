"""Anthropic's Messages API wire models, vLLM's own, and the checks our server adds to them
before a key's budget is touched."""

from vllm.entrypoints.anthropic.protocol import (
    AnthropicCountTokensRequest,
    AnthropicCountTokensResponse,
    AnthropicMessagesRequest,
    AnthropicMessagesResponse,
    AnthropicUsage,
)

from serve_app.apis.bodies import json_object, validated
from serve_app.errors import BadRequest

__all__ = [
    "AnthropicCountTokensResponse",
    "AnthropicMessagesResponse",
    "parse_count_tokens",
    "parse_messages",
    "usage_counts",
]


def parse_messages(body: bytes) -> AnthropicMessagesRequest:
    """`max_tokens` is required and positive (vLLM's model checks it, as Anthropic's API does);
    an empty conversation would reach the chat template."""
    message = validated(AnthropicMessagesRequest, json_object(body), body)
    if not message.messages:
        raise BadRequest("invalid request body: messages: must be a list of at least one message")
    return message


def parse_count_tokens(body: bytes) -> AnthropicCountTokensRequest:
    return validated(AnthropicCountTokensRequest, json_object(body), body)


def usage_counts(usage: AnthropicUsage | dict | None) -> dict[str, int] | None:
    """Anthropic's usage in the ledger's terms: its `input_tokens` leave out the prompt's tokens
    read from or written to a prompt cache, which the ledger counts as prompt tokens."""
    if usage is None:
        return None
    if isinstance(usage, AnthropicUsage):
        usage = usage.model_dump()
    prompt = sum(
        usage.get(name) or 0 for name in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    return {"prompt_tokens": prompt, "completion_tokens": usage.get("output_tokens") or 0}
