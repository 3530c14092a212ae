"""What both chat APIs do to a request before it goes to its model, in one place: the server's
`max_tokens` cap, usage asked of vLLM on every stream chunk, and the tokens a key's budget
reserves for it."""

import json

from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from serve_app.errors import BadRequest


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


def for_engine(chat: ChatCompletionRequest, model_id: str, max_tokens: int | None) -> ChatCompletionRequest:
    """Streams ask vLLM for usage on every chunk, whatever the client asked: the request log and
    the ledger then count even an abandoned stream's tokens, and the Livepeer gateway takes usage
    from the last chunk. Each API forwards only as much of it as its client asked for."""
    # vLLM's disaggregated prefill takes a prompt's token ids from here instead of its messages,
    # which would slip past the prompt's bound that budgets reserve; this server runs no such
    # prefill, so the field has no use here.
    update: dict = {"model": model_id, "kv_transfer_params": None}
    if max_tokens is not None and chat.max_completion_tokens is None:
        update["max_tokens"] = max_tokens
    if chat.stream:
        asked = chat.stream_options or StreamOptions()
        update["stream_options"] = asked.model_copy(update={"include_usage": True, "continuous_usage_stats": True})
    return chat.model_copy(update=update)


def reserved_tokens(chat: ChatCompletionRequest) -> int:
    """The most the request can generate, which its key's tokens-per-minute budget holds back
    until the real count is known."""
    return (chat.max_completion_tokens or chat.max_tokens or 0) * (chat.n or 1)


PROMPT_OVERHEAD_TOKENS = 64
MESSAGE_OVERHEAD_TOKENS = 16


def prompt_token_bound(chat: ChatCompletionRequest) -> int:
    """The most tokens the prompt can count, without tokenizing it: a token covers at least one
    byte of the text (the messages and tools as JSON, which hold more bytes than their text), and
    a chat template adds a few tokens per message and a default system prompt at most. A budget
    reserves this beside max_tokens, so that the real count never exceeds the reservation."""
    text = json.dumps(chat.messages, default=str) + (json.dumps(chat.tools, default=str) if chat.tools else "")
    return len(text.encode()) + MESSAGE_OVERHEAD_TOKENS * len(chat.messages) + PROMPT_OVERHEAD_TOKENS
