"""A Ray Serve application serving chat completions from vLLM engines behind the Livepeer `/llm`
API and an OpenAI-compatible API."""

from serve_app.app import build_app

__all__ = ["build_app"]
