"""Wire models of the Livepeer `/llm` API (docs/livepeer-contract.md), and the one conversion of
an `/llm` request into a vLLM chat request.

The response is typed as `TypedDict`s: the chunks are built once per token on the hot path, as
plain dicts, and these same types document the route (OpenAPI) and check every chunk in tests.
"""

from typing import Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator, with_config
from typing_extensions import TypedDict
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from serve_app.errors import from_validation

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

    @classmethod
    def from_body(cls, body: bytes) -> "LLMRequest":
        try:
            return cls.model_validate_json(body)
        except ValidationError as error:
            raise from_validation(error, "request body", body) from None

    @property
    def asked_max_tokens(self) -> int | None:
        """The client's own max_tokens; the default is ours, and bows to the server's cap."""
        return self.max_tokens if "max_tokens" in self.model_fields_set else None

    def to_chat_request(self) -> ChatCompletionRequest:
        """The model, the cap and stream options are set by `request_policy.for_engine`."""
        return ChatCompletionRequest(
            messages=[{"role": m.role, "content": m.text()} for m in self.messages],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            top_p=self.top_p,
            top_k=self.top_k,
            stream=self.stream,
        )


_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class LLMUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@with_config(_STRICT)
class LLMDelta(TypedDict):
    role: Literal["assistant"]
    content: str


@with_config(_STRICT)
class LLMChoice(TypedDict):
    index: int
    finish_reason: str | None
    """None on content chunks; "stop", "length", or "error" on the last."""
    delta: LLMDelta
    message: NotRequired[LLMDelta]
    """In a whole answer only, beside `delta`, which older clients read."""


@with_config(_STRICT)
class LLMError(TypedDict):
    message: str


@with_config(_STRICT)
class LLMResponse(TypedDict):
    """Both the whole answer and each stream chunk: the contract gives them one shape. `choices`
    is never empty (the gateway indexes `choices[0]` unchecked); `error` appears only on the last
    chunk of a stream that failed after it started."""

    id: str
    model: str
    created: int
    usage: LLMUsage
    choices: list[LLMChoice]
    error: NotRequired[LLMError]
