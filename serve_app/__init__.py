"""A Ray Serve application serving chat completions from vLLM engines behind the Livepeer `/llm`
API and an OpenAI-compatible API. The builder is `serve_app.app:build_app`; this package imports
nothing itself, so a replica that needs only the ledger or the rate limiter does not load vLLM."""
