"""OpenAI-compatible wire models: vLLM's own, re-exported, and the checks our server adds to
vLLM's requests (chat, completions, tokenization) before a key's budget is touched."""

import json
from typing import Any

from pydantic import ValidationError
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

from serve_app.apis.bodies import json_object, validated
from serve_app.errors import BadRequest

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "StreamOptions",
    "parse_chat",
    "parse_completion",
    "parse_detokenize",
    "parse_embeddings",
    "parse_responses",
    "parse_tokenize",
]

KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
TEXT_PART_TYPES = {"text", "input_text", "output_text", "refusal", "thinking"}
"""Content parts whose words are under `text` (`refusal` under `refusal`, `thinking` under
`thinking`), as vLLM's chat parser reads them."""


def parse_chat(body: bytes) -> ChatCompletionRequest:
    """The body is parsed here and its shape checked before vLLM's model sees it: that model's
    own checks across fields run on the raw JSON first and assume its types (`messages` not a
    list raised TypeError, a 500)."""
    document = json_object(body)
    _check_shape(document)
    chat = validated(ChatCompletionRequest, document, body)
    _check_counts(chat, ("n", "max_tokens", "max_completion_tokens"))
    _check_contents(chat)
    return chat


def parse_completion(body: bytes) -> CompletionRequest:
    """`prompt_embeds` would reach the engine as tensors whose tokens no budget can bound, and
    vLLM serves them only where its server enables them, which this one does not."""
    document = json_object(body)
    if document.get("prompt_embeds") is not None:
        raise BadRequest("invalid request body: prompt_embeds: not served here; send prompt as text or token ids")
    _check_type(document.get("prompt"), "prompt", str | list)
    if not document.get("prompt"):
        raise BadRequest("invalid request body: prompt: must be a text, a list of texts or token ids, not empty")
    completion = validated(CompletionRequest, document, body)
    _check_counts(completion, ("n", "max_tokens"))
    return completion


STATEFUL = {
    "store": "stored responses",
    "previous_response_id": "previous responses",
    "previous_input_messages": "previous messages",
    "background": "background responses",
    "conversation": "conversations",
}
"""Responses API fields that need state on the server, which this one does not keep: each
refused when set (`store: false`, the default here, is stateless)."""


def parse_responses(body: bytes) -> ResponsesRequest:
    """vLLM's Responses request stores answers by default and needs them for
    `previous_response_id`; vLLM's server drops them unless told to keep them, in one process's
    memory, which several replicas could not share. Here nothing is stored, and a request that
    asks for it is told so."""
    document = json_object(body)
    for field, what in STATEFUL.items():
        if document.get(field):
            raise BadRequest(f"invalid request body: {field}: {what} are not kept by this server; send the whole input")
    _check_type(document.get("input"), "input", str | list, unset_ok=False)
    responses = validated(ResponsesRequest, document | {"store": False}, body)
    _check_counts(responses, ("max_output_tokens",))
    return responses


def parse_embeddings(body: bytes) -> EmbeddingCompletionRequest | EmbeddingChatRequest:
    """An `input` (a text, token ids, or a batch of either), or vLLM's `messages` rendered with
    the chat template. Embeddings come as floats or base64 in JSON; vLLM's raw `bytes` formats
    answer with a stream of bytes this server does not pass through."""
    document = json_object(body)
    if document.get("encoding_format") not in (None, "float", "base64"):
        raise BadRequest("invalid request body: encoding_format: must be float or base64")
    if "messages" in document:
        _check_shape(document)
        chat = validated(EmbeddingChatRequest, document, body)
        _check_contents(chat)
        return chat
    _check_type(document.get("input"), "input", str | list, unset_ok=False)
    if not document["input"]:
        raise BadRequest("invalid request body: input: must be a text, a list of texts or token ids, not empty")
    return validated(EmbeddingCompletionRequest, document, body)


def parse_tokenize(body: bytes) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """vLLM's `/tokenize` takes a prompt, or messages that it renders with the chat template."""
    document = json_object(body)
    if "messages" in document:
        _check_shape(document)
        chat = validated(TokenizeChatRequest, document, body)
        _check_contents(chat)
        return chat
    return validated(TokenizeCompletionRequest, document, body)


def parse_detokenize(body: bytes) -> DetokenizeRequest:
    return validated(DetokenizeRequest, json_object(body), body)


def _check_shape(document: dict[str, Any]) -> None:
    """What vLLM's checks on the raw JSON assume, and a message's fields, each refused in one
    sentence naming its place (vLLM's model would name each kind of message it tried)."""
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("invalid request body: messages: must be a list of at least one message")
    for index, message in enumerate(messages):
        _check_message(message, f"messages.{index}")
    _check_type(document.get("tools"), "tools", list)
    _check_type(document.get("structured_outputs"), "structured_outputs", dict)
    for index, tool in enumerate(document.get("tools") or ()):
        _check_type(tool, f"tools.{index}", dict, unset_ok=False)
        _check_type(tool.get("function"), f"tools.{index}.function", dict, unset_ok=False)
        _check_type(tool["function"].get("name"), f"tools.{index}.function.name", str, unset_ok=False)


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise BadRequest(f"invalid request body: {where}: must be an object with a role and content")
    role = message.get("role")
    if not isinstance(role, str) or role not in KNOWN_ROLES:
        given = json.dumps(role, ensure_ascii=False)  # as the client wrote it: `null`, not Python's `None`
        raise BadRequest(f"invalid request body: {where}.role: {given} is not one of {', '.join(sorted(KNOWN_ROLES))}")
    for name in ("name", "tool_call_id"):
        _check_type(message.get(name), f"{where}.{name}", str)
    tool_calls = message.get("tool_calls")
    _check_type(tool_calls, f"{where}.tool_calls", list)
    for index, call in enumerate(tool_calls or ()):
        _check_type(call, f"{where}.tool_calls.{index}", dict, unset_ok=False)
    content = message.get("content")
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"invalid request body: {where}.content: must be a string, null or a list of content parts")
    for index, part in enumerate(content):
        if isinstance(part, str):
            continue
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise BadRequest(
                f"invalid request body: {where}.content.{index}: must be a string or an object with a string type"
            )
        field = kind if kind in ("refusal", "thinking") else "text"
        if kind in TEXT_PART_TYPES and not isinstance(part.get(field), str):
            raise BadRequest(f"invalid request body: {where}.content.{index}.{field}: must be a string")


def _check_type(value: Any, where: str, kind: Any, unset_ok: bool = True) -> None:
    """None is a field left unset, as vLLM's model reads it, where such a field may be."""
    if not (isinstance(value, kind) or (unset_ok and value is None)):
        noun = {str: "a string", list: "a list", dict: "an object", str | list: "a string or a list"}[kind]
        raise BadRequest(f"invalid request body: {where}: must be {noun}")


def _check_counts(
    request: ChatCompletionRequest | CompletionRequest | ResponsesRequest, names: tuple[str, ...]
) -> None:
    """vLLM's models accept counts below 1 (its sampling parameters refuse those later, after a
    negative reservation against the key's tokens-per-minute budget would have let other requests
    through)."""
    for name in names:
        value = getattr(request, name)
        if value is not None and value < 1:
            raise BadRequest(f"invalid request body: {name}: must be at least 1, not {value}")


def _check_contents(chat: ChatCompletionRequest | TokenizeChatRequest | EmbeddingChatRequest) -> None:
    """vLLM's model validates some messages' content parts only as they are first read, and holds
    them meanwhile in an iterator that cannot cross a Ray hop to the model's replica: they are
    read here, so that a bad part is a 400 now."""
    for index, message in enumerate(chat.messages):
        content = message.get("content") if isinstance(message, dict) else None
        if content is None or isinstance(content, str | list):
            continue
        try:
            message["content"] = list(content)
        except ValidationError as error:
            place = error.errors(include_url=False)[0]["loc"][:1]
            where = ".".join(str(step) for step in ("messages", index, "content", *place))
            raise BadRequest(f"invalid request body: {where}: not a content part this server reads") from None
