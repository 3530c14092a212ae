"""Wire models of the Livepeer `/llm` API, and the one conversion of an `/llm` request into a
vLLM chat request. OpenAI-compatible routes use vLLM's own models, re-exported here."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ErrorResponse",
    "LLMChoice",
    "LLMMessage",
    "LLMRequest",
    "LLMResponse",
    "LLMUsage",
    "StreamOptions",
]

LLM_DEFAULTS: dict[str, Any] = {
    "model": "",
    "temperature": 0.7,
    "max_tokens": 256,
    "top_p": 1.0,
    "top_k": -1,
    "stream": False,
}
"""The `/llm` defaults. The gateway forwards bodies without filling them in, and some clients
send explicit nulls for unset fields, so a null means the default too."""


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class LLMMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class LLMRequest(BaseModel):
    """Lenient about unknown keys (clients send extras), strict about values."""

    model_config = ConfigDict(extra="ignore")

    messages: list[LLMMessage] = Field(min_length=1)
    model: str = LLM_DEFAULTS["model"]
    temperature: float = Field(LLM_DEFAULTS["temperature"], ge=0, le=2)
    max_tokens: int = Field(LLM_DEFAULTS["max_tokens"], ge=1)
    top_p: float = Field(LLM_DEFAULTS["top_p"], gt=0, le=1)
    top_k: int = Field(LLM_DEFAULTS["top_k"], ge=-1)
    stream: bool = LLM_DEFAULTS["stream"]

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in LLM_DEFAULTS)}
        return data

    @field_validator("top_k")
    @classmethod
    def _top_k_off_or_positive(cls, value: int) -> int:
        if value == 0:
            raise ValueError("top_k must be -1 (off) or at least 1")
        return value

    def to_chat_request(self, model_id: str, max_tokens_limit: int | None) -> ChatCompletionRequest:
        """The `/llm` default max_tokens is ours, so it bows to the server's limit; a max_tokens
        the client chose is passed on for the ingress to check. Streams ask vLLM for usage on
        every chunk: the gateway takes usage from the last one."""
        max_tokens = self.max_tokens
        if max_tokens_limit is not None and "max_tokens" not in self.model_fields_set:
            max_tokens = min(max_tokens, max_tokens_limit)
        return ChatCompletionRequest(
            model=model_id,
            messages=[{"role": m.role, "content": m.text()} for m in self.messages],
            temperature=self.temperature,
            max_tokens=max_tokens,
            top_p=self.top_p,
            top_k=self.top_k,
            stream=self.stream,
            stream_options=(
                {"include_usage": True, "continuous_usage_stats": True} if self.stream else None
            ),
        )


class LLMUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class LLMDelta(BaseModel):
    role: str = "assistant"
    content: str = ""


class LLMChoice(BaseModel):
    index: int = 0
    finish_reason: str | None = None
    delta: LLMDelta = Field(default_factory=LLMDelta)
    message: LLMDelta | None = None


class LLMResponse(BaseModel):
    """Both the full response and each stream chunk: the contract gives them one shape.
    `error` appears only on the final chunk of a stream that failed after it started."""

    id: str
    model: str
    created: int
    usage: LLMUsage
    choices: list[LLMChoice]
    error: dict[str, str] | None = None
