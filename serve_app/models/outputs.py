"""What a model yields per request, across a Serve hop or within the ingress's own replica: one
whole answer (vLLM's response for its API), or a stream of chunk JSON payloads, and, in place of
either or after some chunks, a `ModelError`. The replica, which knows vLLM's wire format, turns
vLLM's error responses and error events into `ModelError`; the ingress never reads a payload to
find one."""

from dataclasses import dataclass

from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensResponse, AnthropicMessagesResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse
from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeResponse, TokenizeResponse


@dataclass(frozen=True)
class ModelError:
    """A failure the engine told in its own terms, with the status vLLM's server would answer."""

    status: int
    message: str


WholeAnswer = (
    ChatCompletionResponse
    | CompletionResponse
    | ResponsesResponse
    | AnthropicMessagesResponse
    | AnthropicCountTokensResponse
    | EmbeddingResponse
    | TokenizeResponse
    | DetokenizeResponse
)

ModelOutput = WholeAnswer | ModelError | str
"""`str`: one stream chunk's JSON, without SSE framing; for Anthropic's Messages API
and OpenAI's Responses API, whose events are named, the whole `event: …` and `data: …` frame."""
