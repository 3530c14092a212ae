"""Shaping vLLM's chat output into the Livepeer `/llm` contract.

Pure functions over plain dicts: they run once per token on the hot path. The rules come from
`livepeer-contract.md`: every chunk has the full top-level shape, `choices` is never empty (the
gateway indexes `choices[0]` unchecked), usage is cumulative, the last chunk has empty content
and a non-empty `finish_reason`, and a failure after the stream began still ends that way.
"""

from dataclasses import dataclass, field
from typing import Any

from serve_app.protocol import ChatCompletionResponse


@dataclass
class StreamState:
    """What the stream has seen so far: identity and cumulative usage for every chunk."""

    id: str = ""
    model: str = ""
    created: int = 0
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    )
    finish_reason: str | None = None


def full_response(response: ChatCompletionResponse) -> dict[str, Any]:
    choice = response.choices[0]
    text = {"role": "assistant", "content": choice.message.content or ""}
    return {
        "id": response.id,
        "model": response.model,
        "created": response.created,
        "usage": _usage(response.usage.model_dump()),
        "choices": [
            {
                "index": 0,
                "finish_reason": choice.finish_reason,
                "message": text,
                "delta": text,
            }
        ],
    }


def stream_chunks(vllm_chunk: dict[str, Any], state: StreamState) -> list[dict[str, Any]]:
    """The `/llm` chunks for one vLLM chunk: none for role-only or usage-only chunks, one per new
    text, and the final chunk once a finish reason arrives."""
    if "error" in vllm_chunk:
        return [failure_chunk(state, vllm_chunk["error"].get("message", "generation failed"))]
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
            state.finish_reason = choice["finish_reason"]
            chunks.append(_chunk(state, "", state.finish_reason))
    return chunks


def failure_chunk(state: StreamState, message: str) -> dict[str, Any]:
    """A well-formed last chunk for a stream that broke after its 200 went out."""
    state.finish_reason = "error"
    chunk = _chunk(state, "", "error")
    chunk["error"] = {"message": message}
    return chunk


def _chunk(state: StreamState, content: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": state.id,
        "model": state.model,
        "created": state.created,
        "usage": dict(state.usage),
        "choices": [
            {
                "index": 0,
                "finish_reason": finish_reason,
                "delta": {"role": "assistant", "content": content},
            }
        ],
    }


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
