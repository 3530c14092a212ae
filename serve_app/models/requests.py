"""The requests a model answers: vLLM's own protocol types, one per route of its OpenAI-compatible
server that this server serves. Each travels to the model's replica as it is, and the replica
hands it to the vLLM serving class for its type (`engine.VLLMEngine`)."""

from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.pooling.embed.protocol import EmbeddingChatRequest, EmbeddingCompletionRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

GenerationRequest = ChatCompletionRequest | CompletionRequest
"""A request the engine generates for: it has `max_tokens`, `n`, `stream` and `stream_options`."""

EngineRequest = (
    GenerationRequest
    | ResponsesRequest
    | AnthropicMessagesRequest
    | AnthropicCountTokensRequest
    | EmbeddingCompletionRequest
    | EmbeddingChatRequest
    | TokenizeCompletionRequest
    | TokenizeChatRequest
    | DetokenizeRequest
)
