"""The engines the session's application does not have, on one application of their own (their
engines load side by side, its ingress, ledger, limiter and key registry start once), through HTTP:

- LoRA adapters on the real small model: two adapters made here with `peft` (random, non-zero
  weights, so that they change the model's answers), one named in the config and one found in the
  adapter directory at request time; each answers differently from the base model and the same
  every time, the least recently used one is unloaded when a replica may hold only one and loaded
  again when asked, an unknown adapter is a 404 naming those there are, and the ledger and
  `/v1/models` know the adapters by their own ids;
- `/v1/embeddings` on a real embedding model (all-MiniLM-L6-v2, shipped zipped in a PyPI package)
  through the official `openai` SDK: vectors whose similarities say which sentences are alike, the
  prompt's tokens in the ledger under the route; and a chat request to a model that only embeds is
  the client's mistake."""

import math
import time

import httpx
import openai
import pytest
from ray import serve

from cluster.load import load
from cluster.schema import ClusterConfig
from serve_app.app import build_app
from serve_app.models import sources
from tests.conftest import API_KEY, ROOT, delete_app, ledger_in
from tests.lora_adapters import make_adapter
from tests.polling import until
from tests.serve_logs import lines_of

pytestmark = pytest.mark.e2e

APP = "engines"
BASE = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def engines_url(serve_url, llm_url, tmp_path_factory):
    """The shipped model, apart from the ingress (adapters are routed by Serve's multiplexing),
    with room for one adapter per replica; beside it the embedding model."""
    folder = tmp_path_factory.mktemp("adapters")
    raw = load(ROOT / "configs" / "local.yaml").apps["llm"].model_dump()
    base = sources.resolve(ClusterConfig.model_validate(raw).models[0].source)
    make_adapter(base, folder / "pirate", seed=1)
    make_adapter(base, folder / "found" / "sailor", seed=2)
    raw["ingress"]["colocate"] = False
    raw["usage"] = ledger_in(tmp_path_factory.mktemp("engines-ledger")).model_dump()
    model = raw["models"][0]
    model["engine"]["enforce_eager"] = True
    model["lora"] = {
        "adapters": [{"id": "pirate", "source": {"path": str(folder / "pirate")}}],
        "directory": str(folder / "found"),
        "max_loaded": 1,
    }
    raw["models"].append(
        {
            "id": EMBEDDER,
            "source": {"package": "all_minilm_l6_v2", "archive": "model.zip"},
            "engine": {"dtype": "float32", "max_model_len": 256},
            "deployment": {"num_cpus": 0.5, "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
        }
    )
    serve.run(build_app(ClusterConfig.model_validate(raw)), name=APP, route_prefix="/" + APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


@pytest.fixture
def engines(engines_url):
    with httpx.Client(base_url=engines_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=180) as client:
        yield client


def _answer(client: httpx.Client, model: str) -> str:
    response = client.post(
        "/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 12, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model.rpartition(":")[2]  # an adapter answers by its own id
    return response.json()["choices"][0]["message"]["content"]


def _loads(adapter_id: str) -> int:
    return len(lines_of(f"loaded LoRA adapter {adapter_id} from", APP))


def test_adapters_answer_as_themselves_are_evicted_and_loaded_again(engines):
    since = time.time()
    base = _answer(engines, BASE)
    pirate = _answer(engines, "pirate")
    assert pirate != base and _answer(engines, f"{BASE}:pirate") == pirate  # its other name, the same adapter
    sailor = _answer(engines, "sailor")  # found in the directory; the replica holds one: pirate goes
    assert sailor not in (base, pirate)
    until(lambda: lines_of("unloaded LoRA adapter pirate", APP), 30, "pirate to be unloaded for sailor")
    assert _loads("pirate") == 1
    assert _answer(engines, "pirate") == pirate  # loaded again, the same weights, the same answer
    until(lambda: _loads("pirate") == 2, 30, "pirate to be loaded again")
    assert _answer(engines, BASE) == base  # the base model untouched by its adapters

    def ledger() -> dict | None:
        rows = engines.get("/admin/usage", params={"since": since, "group_by": "model"}).json()["data"]
        counts = {row["model"]: row["requests"] for row in rows}
        return counts if counts == {BASE: 2, "pirate": 3, "sailor": 1} else None

    until(ledger, 20, "the ledger to record each adapter's requests under its own id")


def test_adapters_are_listed_with_their_base_and_an_unknown_one_is_a_404_naming_them(engines):
    entries = {entry["id"]: entry for entry in engines.get("/v1/models").json()["data"]}
    assert set(entries) == {BASE, "pirate", "sailor", EMBEDDER}
    assert entries["pirate"]["parent"] == entries["sailor"]["parent"] == BASE
    assert entries["pirate"]["aliases"] == [f"{BASE}:pirate"] and "parent" not in entries[BASE]
    missing = engines.post("/v1/chat/completions", json={"model": "captain", "messages": ASK, "max_tokens": 4})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"].endswith(
        "available models: smollm2-135m-instruct, smollm2, all-minilm-l6-v2, pirate, sailor"
    )


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_embeddings_tell_alike_sentences_apart_and_are_recorded(engines_url, engines):
    since = time.time()
    sdk = openai.OpenAI(base_url=engines_url + "/v1", api_key=API_KEY, max_retries=0)
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly tax filings are due."]
    result = sdk.embeddings.create(model=EMBEDDER, input=texts)
    cat, kitten, taxes = (item.embedding for item in result.data)
    assert len(cat) == 384 and [item.index for item in result.data] == [0, 1, 2]
    assert _cosine(cat, kitten) > 0.5 > _cosine(cat, taxes)
    assert result.usage.prompt_tokens > len(texts)

    def ledger() -> dict | None:
        rows = engines.get("/admin/usage", params={"since": since, "group_by": "endpoint"}).json()["data"]
        return next((row for row in rows if row["endpoint"] == "/v1/embeddings"), None)

    row = until(ledger, 15, "the ledger to record the embeddings request")
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (1, result.usage.prompt_tokens, 0)
    chat = engines.post(
        "/v1/chat/completions", json={"model": EMBEDDER, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 400 and "does not serve this API" in chat.json()["error"]["message"]
