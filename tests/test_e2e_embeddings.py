"""`/v1/embeddings` on a real embedding model (all-MiniLM-L6-v2, shipped zipped in a PyPI
package) on vLLM's CPU build, through the official `openai` SDK: vectors whose similarities say
which sentences are alike, the prompt's tokens in the ledger under the route; and a chat request
to a model that only embeds is the client's mistake."""

import math
import time

import httpx
import openai
import pytest
from ray import serve

from cluster.schema import ClusterConfig
from serve_app.app import build_app
from tests.conftest import API_KEY, delete_app, ledger_in
from tests.polling import until

pytestmark = pytest.mark.e2e

APP = "embed"
MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embed_url(serve_url, tmp_path_factory):
    config = ClusterConfig.model_validate(
        {
            "auth": {"keys": [{"name": "local", "env": "LLM_API_KEY", "scopes": ["chat", "admin"]}]},
            "usage": ledger_in(tmp_path_factory.mktemp("embed-ledger")).model_dump(),
            "models": [
                {
                    "id": MODEL,
                    "source": {"package": "all_minilm_l6_v2", "archive": "model.zip"},
                    "engine": {"dtype": "float32", "max_model_len": 256},
                    "deployment": {"num_cpus": 0.5, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
                }
            ],
        }
    )
    serve.run(build_app(config), name=APP, route_prefix="/" + APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_embeddings_tell_alike_sentences_apart_and_are_recorded(embed_url):
    since = time.time()
    sdk = openai.OpenAI(base_url=embed_url + "/v1", api_key=API_KEY, max_retries=0)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filings are due."]
    result = sdk.embeddings.create(model=MODEL, input=texts)
    cat, kitten, taxes = (item.embedding for item in result.data)
    assert len(cat) == 384 and [item.index for item in result.data] == [0, 1, 2]
    assert _cosine(cat, kitten) > 0.5 > _cosine(cat, taxes)
    assert result.usage.prompt_tokens > len(texts)

    with httpx.Client(base_url=embed_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:

        def ledger() -> dict | None:
            rows = client.get("/admin/usage", params={"since": since, "group_by": "endpoint"}).json()["data"]
            return next((row for row in rows if row["endpoint"] == "/v1/embeddings"), None)

        row = until(ledger, 15, "the ledger to record the embeddings request")
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (1, result.usage.prompt_tokens, 0)
        chat = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 400 and "does not serve this API" in chat.json()["error"]["message"]
