"""LoRA adapters on the real small model, through HTTP: two adapters made here with `peft` (random,
non-zero weights, so that they change the model's answers), one named in the config and one
found in the adapter directory at request time; each answers differently from the base model and
the same every time, the least recently used one is unloaded when a replica may hold only one
and loaded again when asked, an unknown adapter is a 404 naming those there are, and the ledger
and `/v1/models` know the adapters by their own ids."""

import time

import httpx
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

APP = "lora"
BASE = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def lora_url(serve_url, llm_url, tmp_path_factory):
    """The shipped model, apart from the ingress (adapters are routed by Serve's multiplexing),
    with room for one adapter per replica."""
    folder = tmp_path_factory.mktemp("adapters")
    raw = load(ROOT / "configs" / "local.yaml").apps["llm"].model_dump()
    base = sources.resolve(ClusterConfig.model_validate(raw).models[0].source)
    make_adapter(base, folder / "pirate", seed=1)
    make_adapter(base, folder / "found" / "sailor", seed=2)
    raw["ingress"]["colocate"] = False
    raw["usage"] = ledger_in(tmp_path_factory.mktemp("lora-ledger")).model_dump()
    model = raw["models"][0]
    model["engine"]["enforce_eager"] = True
    model["lora"] = {
        "adapters": [{"id": "pirate", "source": {"path": str(folder / "pirate")}}],
        "directory": str(folder / "found"),
        "max_loaded": 1,
    }
    serve.run(build_app(ClusterConfig.model_validate(raw)), name=APP, route_prefix="/" + APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


@pytest.fixture
def lora(lora_url):
    with httpx.Client(base_url=lora_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=180) as client:
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


def test_adapters_answer_as_themselves_are_evicted_and_loaded_again(lora):
    since = time.time()
    base = _answer(lora, BASE)
    pirate = _answer(lora, "pirate")
    assert pirate != base and _answer(lora, f"{BASE}:pirate") == pirate  # its other name, the same adapter
    sailor = _answer(lora, "sailor")  # found in the directory; the replica holds one: pirate goes
    assert sailor not in (base, pirate)
    until(lambda: lines_of("unloaded LoRA adapter pirate", APP), 30, "pirate to be unloaded for sailor")
    assert _loads("pirate") == 1
    assert _answer(lora, "pirate") == pirate  # loaded again, the same weights, the same answer
    until(lambda: _loads("pirate") == 2, 30, "pirate to be loaded again")
    assert _answer(lora, BASE) == base  # the base model untouched by its adapters

    def ledger() -> dict | None:
        rows = lora.get("/admin/usage", params={"since": since, "group_by": "model"}).json()["data"]
        counts = {row["model"]: row["requests"] for row in rows}
        return counts if counts == {BASE: 2, "pirate": 3, "sailor": 1} else None

    until(ledger, 20, "the ledger to record each adapter's requests under its own id")


def test_adapters_are_listed_with_their_base_and_an_unknown_one_is_a_404_naming_them(lora):
    entries = {entry["id"]: entry for entry in lora.get("/v1/models").json()["data"]}
    assert set(entries) == {BASE, "pirate", "sailor"}
    assert entries["pirate"]["parent"] == entries["sailor"]["parent"] == BASE
    assert entries["pirate"]["aliases"] == [f"{BASE}:pirate"] and "parent" not in entries[BASE]
    missing = lora.post("/v1/chat/completions", json={"model": "captain", "messages": ASK, "max_tokens": 4})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"].endswith(
        "available models: smollm2-135m-instruct, smollm2, pirate, sailor"
    )
