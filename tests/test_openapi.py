"""The API's OpenAPI document, as the ingress's FastAPI app serves it at /openapi.json."""

import serve_app.ingress  # noqa: F401  (declares the routes on the app)
from serve_app.apis.livepeer.protocol import LLMResponse
from serve_app.http.app import app


def test_the_llm_route_documents_the_response_type_the_code_builds():
    schema = app.openapi()
    documented = schema["paths"]["/llm"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    component = schema["components"]["schemas"][documented["$ref"].rsplit("/", 1)[1]]
    assert set(component["properties"]) == set(LLMResponse.__annotations__)
    assert set(component["required"]) == set(LLMResponse.__required_keys__)
    assert "error" in LLMResponse.__optional_keys__
    assert "/llm/" not in schema["paths"]  # the alias is served, not documented twice
