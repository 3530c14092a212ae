"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), served by vLLM's own
Anthropic serving class, as the `anthropic` SDK and the agents built on it call it."""
