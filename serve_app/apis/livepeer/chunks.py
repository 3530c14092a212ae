"""Shaping vLLM's chat output into the Livepeer `/llm` contract.

Pure functions over plain dicts: they run once per token on the hot path. The rules come from
docs/livepeer-contract.md: every chunk has the full top-level shape, `choices` is never empty (the
gateway indexes `choices[0]` unchecked), usage is cumulative, the last chunk has empty content
and a non-empty `finish_reason`, and a failure after the stream began still ends that way.
"""

from dataclasses import dataclass, field
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

from serve_app.apis.livepeer.protocol import LLMChoice, LLMDelta, LLMResponse, LLMUsage


@dataclass
class StreamState:
    """What the stream has seen so far: identity and cumulative usage for every chunk."""

    id: str = ""
    model: str = ""
    created: int = 0
    usage: LLMUsage = field(default_factory=lambda: LLMUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0))
    final_sent: bool = False
    """The chunk with the finish reason was built: the contract has one."""


def full_response(response: ChatCompletionResponse) -> LLMResponse:
    choice = response.choices[0]
    text = LLMDelta(role="assistant", content=choice.message.content or "")
    return LLMResponse(
        id=response.id,
        model=response.model,
        created=response.created,
        usage=_usage(response.usage.model_dump()),
        choices=[LLMChoice(index=0, finish_reason=choice.finish_reason, message=text, delta=text)],
    )


def stream_chunks(vllm_chunk: dict[str, Any], state: StreamState) -> list[LLMResponse]:
    """The `/llm` chunks for one vLLM chunk: none for role-only or usage-only chunks, one per new
    text, and the final chunk once a finish reason arrives."""
    state.id = vllm_chunk["id"]
    state.model = vllm_chunk["model"]
    state.created = vllm_chunk["created"]
    if vllm_chunk.get("usage"):
        state.usage = _usage(vllm_chunk["usage"])
    chunks = []
    for choice in vllm_chunk["choices"]:
        if choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content") or ""
        if content:
            chunks.append(_chunk(state, content, None))
        if choice.get("finish_reason"):
            chunks.append(_chunk(state, "", choice["finish_reason"]))
            state.final_sent = True
    return chunks


def failure_chunk(state: StreamState, message: str) -> LLMResponse:
    """A well-formed last chunk for a stream that broke after its 200 went out."""
    chunk = _chunk(state, "", "error")
    chunk["error"] = {"message": message}
    return chunk


def _chunk(state: StreamState, content: str, finish_reason: str | None) -> LLMResponse:
    """Dict literals, checked against `LLMResponse` by type checkers and tests: the TypedDicts'
    constructor calls cost the hot path a call each."""
    chunk: LLMResponse = {
        "id": state.id,
        "model": state.model,
        "created": state.created,
        "usage": dict(state.usage),
        "choices": [{"index": 0, "finish_reason": finish_reason, "delta": {"role": "assistant", "content": content}}],
    }
    return chunk


def _usage(usage: dict[str, Any]) -> LLMUsage:
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return LLMUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
