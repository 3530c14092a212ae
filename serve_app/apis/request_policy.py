"""What every API does to a request before it goes to its model, in one place: the server's
`max_tokens` cap, usage asked of vLLM on every stream chunk, and the tokens a key's budget
reserves for it."""

import json
from typing import TypeVar

from pydantic import BaseModel
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest

from serve_app.errors import BadRequest
from serve_app.models.requests import EngineRequest, GenerationRequest

R = TypeVar("R", ChatCompletionRequest, CompletionRequest)
E = TypeVar("E", bound=BaseModel)


def capped_max_tokens(asked: int | None, default: int | None, limit: int | None) -> int | None:
    """An honest cap matters to operators: Livepeer prices by `max_tokens`. A client's own value
    above the cap is refused; the API's default (`/llm` has one, OpenAI's has none) bows to it."""
    if asked is not None:
        if limit is not None and asked > limit:
            raise BadRequest(f"max_tokens is {asked}, above this server's limit of {limit}")
        return asked
    if limit is None:
        return default
    return limit if default is None else min(default, limit)


TRANSFER_FIELDS = ("kv_transfer_params", "ec_transfer_params")
"""vLLM's disaggregated prefill takes a prompt's token ids from these instead of its messages
(whatever the API), which would slip past the prompt's bound that budgets reserve; this server
runs no such prefill, so they have no use here."""


def for_model(request: E, model_id: str) -> E:
    """Any API's request as it goes to its model: named by the model's id (or an adapter's), its
    transfer fields dropped."""
    dropped = {name: None for name in TRANSFER_FIELDS if name in type(request).model_fields}
    return request.model_copy(update={"model": model_id} | dropped)


def for_engine(chat: R, model_id: str, max_tokens: int | None) -> R:
    """Streams ask vLLM for usage on every chunk, whatever the client asked: the request log and
    the ledger then count even an abandoned stream's tokens, and the Livepeer gateway takes usage
    from the last chunk. Each API forwards only as much of it as its client asked for."""
    update: dict = {}
    if max_tokens is not None and getattr(chat, "max_completion_tokens", None) is None:
        update["max_tokens"] = max_tokens
    if chat.stream:
        asked = chat.stream_options or StreamOptions()
        update["stream_options"] = asked.model_copy(update={"include_usage": True, "continuous_usage_stats": True})
    return for_model(chat, model_id).model_copy(update=update)


def reserved_tokens(request: EngineRequest) -> int:
    """The most the request can generate, which its key's tokens-per-minute budget holds back
    until the real count is known; none for a request that generates nothing (tokenization)."""
    if isinstance(request, AnthropicMessagesRequest):
        return request.max_tokens  # required by Anthropic's API, for its one answer
    if isinstance(request, ResponsesRequest):
        return request.max_output_tokens or 0
    if not isinstance(request, GenerationRequest):
        return 0
    return (getattr(request, "max_completion_tokens", None) or request.max_tokens or 0) * completions_asked(request)


def generates(request: EngineRequest) -> bool:
    """Whether the engine generates for it: tokenization and token counts only read the prompt."""
    return isinstance(request, GenerationRequest | ResponsesRequest | AnthropicMessagesRequest)


def completions_asked(request: EngineRequest) -> int:
    """Each of its `n` choices, for each prompt of a completion request's batch; the other APIs
    answer once."""
    if not isinstance(request, GenerationRequest):
        return 1
    prompts = len(_prompts(request.prompt)) if isinstance(request, CompletionRequest) else 1
    return (request.n or 1) * prompts


PROMPT_OVERHEAD_TOKENS = 64
MESSAGE_OVERHEAD_TOKENS = 16


def prompt_token_bound(request: EngineRequest) -> int:
    """The most tokens the prompt can count, without tokenizing it: a token covers at least one
    byte of the text (the messages and tools as JSON, which hold more bytes than their text), and
    a chat template adds a few tokens per message and a default system prompt at most; a prompt
    given as token ids counts them. A budget reserves this beside max_tokens, so that the real
    count never exceeds the reservation. Tokenization generates nothing and counts for nothing."""
    if isinstance(request, CompletionRequest):
        return _prompts_bound(request.prompt)
    if isinstance(request, EmbeddingCompletionRequest):
        return _prompts_bound(request.input)
    if isinstance(request, EmbeddingChatRequest):
        text = json.dumps(request.messages, default=str)
        return len(text.encode()) + MESSAGE_OVERHEAD_TOKENS * len(request.messages) + PROMPT_OVERHEAD_TOKENS
    if isinstance(request, AnthropicMessagesRequest):
        text = request.model_dump_json(include={"messages", "system", "tools"}, exclude_none=True)
        return len(text.encode()) + MESSAGE_OVERHEAD_TOKENS * len(request.messages) + PROMPT_OVERHEAD_TOKENS
    if isinstance(request, ResponsesRequest):
        text = request.model_dump_json(include={"input", "instructions", "tools"}, exclude_none=True)
        items = 1 if isinstance(request.input, str) else len(request.input)
        return len(text.encode()) + MESSAGE_OVERHEAD_TOKENS * (items + 1) + PROMPT_OVERHEAD_TOKENS
    if not isinstance(request, ChatCompletionRequest):
        return 0
    text = json.dumps(request.messages, default=str) + (json.dumps(request.tools, default=str) if request.tools else "")
    return len(text.encode()) + MESSAGE_OVERHEAD_TOKENS * len(request.messages) + PROMPT_OVERHEAD_TOKENS


def _prompts(prompt: str | list | None) -> list[str | list[int]]:
    """A completion's (or an embedding's) prompts: a text, token ids, or a batch of either (one
    completion, of `n` choices, per prompt)."""
    if prompt is None:
        return []
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _prompts_bound(prompts: str | list | None) -> int:
    """A text is bounded by its bytes; token ids count themselves."""
    return sum(
        len(prompt.encode()) + PROMPT_OVERHEAD_TOKENS if isinstance(prompt, str) else len(prompt)
        for prompt in _prompts(prompts)
    )
