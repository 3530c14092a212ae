"""The FastAPI application every ingress replica serves."""

from importlib.metadata import version

from fastapi import FastAPI

from serve_app.http import handlers

app = FastAPI(title="Livepeer LLM on Ray Serve", version=version("livepeer-llm-serve"))
handlers.install(app)
