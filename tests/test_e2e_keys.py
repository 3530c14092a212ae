"""Per-key rights, limits and the usage ledger, through HTTP on a real Ray cluster: an application
with two ingress replicas over the test engine (which can hold or stall a request on demand)."""

import hashlib
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

from cluster.schema import ClusterConfig
from tests.conftest import REPLICA_START_S, delete_app, ledger_in, serve_fake
from tests.polling import until
from tests.serve_logs import replica_of
from tests.sse import json_chunks

pytestmark = pytest.mark.e2e

APP = "keys"
TOKENS = {
    name: f"sk-{name}-{secrets.token_hex(8)}"
    for name in ("open", "only-a", "expired", "admin", "rpm", "tpm", "conc", "billing")
}


def _key(name: str, **fields) -> dict:
    return {"name": name, "sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest()} | fields


@pytest.fixture(scope="module")
def keys_url(serve_url, tmp_path_factory):
    deployment = {"num_cpus": 0.05, "num_replicas": 1}
    config = ClusterConfig.model_validate(
        {
            "default_model": "fake-b",
            "usage": ledger_in(tmp_path_factory.mktemp("keys")).model_dump(),
            "ingress": {"num_replicas": 2, "num_cpus": 0.05},
            "auth": {
                "keys": [
                    _key("open"),
                    _key("only-a", models=["a"]),
                    _key("expired", expires_at="2020-01-01T00:00:00Z"),
                    _key("admin", scopes=["admin"]),
                    _key("rpm", limits={"requests_per_minute": 5}),
                    _key("tpm", limits={"tokens_per_minute": 40}),
                    _key("conc", limits={"concurrent_requests": 1}),
                    _key("billing"),
                ]
            },
            "models": [
                {"id": "fake-a", "aliases": ["a"], "source": {"path": "/nonexistent"}, "deployment": deployment},
                {"id": "fake-b", "source": {"path": "/nonexistent"}, "deployment": deployment},
            ],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _ask(text: str = "one two three", **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], **fields}


def _call(url: str, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKENS.get(key, key)}"} | kwargs.pop("headers", {})
    return httpx.request(method, url + path, headers=headers, timeout=30, **kwargs)


def _post(url: str, key: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return _call(url, key, "POST", path, json=body, **kwargs)


def _usage(url: str, **query) -> dict:
    """The ledger's totals for the query, summed over models."""
    response = _call(url, "admin", "GET", "/admin/usage", params=query)
    assert response.status_code == 200, response.text
    totals = {"requests": 0, "failed_requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for row in response.json()["data"]:
        for field in totals:
            totals[field] += row[field]
    return totals


@pytest.mark.parametrize(
    "key, complaint", [("sk-unknown", "invalid bearer token"), ("expired", "'expired' expired at 2020")]
)
def test_unknown_or_expired_key_is_401_in_each_endpoints_shape(keys_url, key, complaint):
    livepeer = _post(keys_url, key, "/llm", _ask())
    assert livepeer.status_code == 401 and livepeer.headers["www-authenticate"] == "Bearer"
    assert complaint in livepeer.json()["detail"]["msg"]
    openai = _post(keys_url, key, "/v1/chat/completions", _ask(model="fake-a"))
    assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"
    assert complaint in openai.json()["error"]["message"]


def test_a_key_sees_and_uses_only_its_models(keys_url):
    listed = _call(keys_url, "only-a", "GET", "/v1/models").json()["data"]
    assert [(m["id"], m["aliases"]) for m in listed] == [("fake-a", ["a"])]
    assert [m["id"] for m in _call(keys_url, "open", "GET", "/v1/models").json()["data"]] == ["fake-a", "fake-b"]
    for name in ("a", "fake-a"):
        assert _post(keys_url, "only-a", "/llm", _ask(model=name)).status_code == 200
    # A model the key may not use is answered as one that does not exist: keys cannot find it.
    hidden, unknown = (_post(keys_url, "only-a", "/llm", _ask(model=name)) for name in ("fake-b", "nope"))
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["detail"]["msg"] == unknown.json()["detail"]["msg"].replace("'nope'", "'fake-b'")
    assert hidden.json()["detail"]["msg"].endswith("available models: fake-a, a")
    default = _post(keys_url, "only-a", "/llm", _ask())
    assert default.status_code == 404 and "fake-b" not in default.json()["detail"]["msg"]
    openai = _post(keys_url, "only-a", "/v1/chat/completions", _ask(model="fake-b"))
    assert openai.status_code == 404 and openai.json()["error"]["type"] == "not_found_error"
    assert openai.json()["error"]["message"].endswith("available models: fake-a, a")


def test_admin_routes_need_the_admin_scope_and_an_admin_only_key_cannot_chat(keys_url):
    refused = _call(keys_url, "open", "GET", "/admin/usage")
    assert refused.status_code == 403 and "lacks the 'admin' scope" in refused.json()["error"]["message"]
    assert _post(keys_url, "admin", "/llm", _ask()).status_code == 403
    assert _call(keys_url, "admin", "GET", "/admin/usage").json()["object"] == "usage"
    bad = _call(keys_url, "admin", "GET", "/admin/usage", params={"since": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "since: 'yesterday' is neither an ISO 8601 time nor unix seconds"
    for value in ("nan", "1e20", "-5"):
        out_of_range = _call(keys_url, "admin", "GET", "/admin/usage", params={"until": value})
        assert out_of_range.status_code == 400 and "not a time this server can represent" in out_of_range.text


def test_requests_per_minute_hold_across_two_ingress_replicas(keys_url):
    paths = ["/llm", "/v1/chat/completions"] * 6
    ids = [f"rpm-{secrets.token_hex(4)}-{index}" for index in range(len(paths))]
    with ThreadPoolExecutor(len(paths)) as pool:
        responses = list(
            pool.map(
                lambda call: _post(keys_url, "rpm", call[0], _ask(model="fake-a"), headers={"x-request-id": call[1]}),
                zip(paths, ids, strict=False),
            )
        )
    assert len({replica_of(request_id, APP) for request_id in ids}) == 2, "both ingress replicas took requests"
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(admitted), len(refused)) == (5, 7)
    assert sorted(r.headers["x-ratelimit-remaining-requests"] for r in admitted) == ["0", "1", "2", "3", "4"]
    for response, path in zip(responses, paths, strict=False):
        if response.status_code != 429:
            continue
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < float(response.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
        if path == "/llm":
            message = response.json()["detail"]["msg"]
        else:
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_exceeded", 429)
            message = error["message"]
        assert message.startswith("API key 'rpm' is at its limit of 5 requests per minute; retry in ")


def test_tokens_are_reserved_up_front_and_settled_to_the_real_count(keys_url, tmp_path):
    holds = [tmp_path / f"hold-{index}" for index in range(2)]
    for hold in holds:
        hold.touch()
    with ThreadPoolExecutor(2) as pool:
        # Each reserves its max_tokens (16); each will use 4 (two words in, two out).
        held = [pool.submit(_post, keys_url, "tpm", "/llm", _ask(f"WAIT {hold}", max_tokens=16)) for hold in holds]
        until(
            lambda: all(hold.with_name(hold.name + ".waiting").exists() for hold in holds),
            15,
            "both held requests to reach the engine",
        )
        refused = _post(keys_url, "tpm", "/v1/chat/completions", _ask(model="fake-a", max_tokens=16))
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-limit-tokens"] == "40"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "8"
        assert "32 used or reserved; this request reserves 16" in refused.json()["error"]["message"]
        too_large = _post(keys_url, "tpm", "/llm", _ask(max_tokens=41))
        assert (
            too_large.status_code == 400
            and "more than API key 'tpm' may use in a minute" in too_large.json()["detail"]["msg"]
        )
        for hold in holds:
            hold.unlink()
        assert [f.result().json()["usage"]["total_tokens"] for f in held] == [4, 4]
    # Settled to 8 of 40, so a request reserving 30 now fits (it would not against the 32 reserved).
    admitted = until(
        lambda: (r := _post(keys_url, "tpm", "/llm", _ask(max_tokens=30))).status_code == 200 and r,
        15,
        "the held requests' reservations to settle",
    )
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "2"


def test_concurrent_requests_over_the_limit_are_refused_until_a_slot_frees(keys_url, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, keys_url, "conc", "/llm", _ask(f"WAIT {hold}"))
        until(lambda: hold.with_name("hold.waiting").exists(), 15, "the held request to reach the engine")
        refused = _post(keys_url, "conc", "/llm", _ask())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "has 1 requests in flight" in refused.json()["detail"]["msg"]
        hold.unlink()
        assert held.result().status_code == 200
    until(lambda: _post(keys_url, "conc", "/llm", _ask()).status_code == 200, 15, "the held request's slot to free")
    # A stream whose client leaves gives its slot back too.
    _read_then_leave(keys_url, "conc", "/llm", _ask("a b STALL c", stream=True), 2)
    until(lambda: _post(keys_url, "conc", "/llm", _ask()).status_code == 200, 15, "the abandoned stream's slot to free")


def _read_then_leave(url: str, key: str, path: str, body: dict, chunks_wanted: int) -> list[dict]:
    """Reads a stream's first content chunks, then drops the connection as a departing client."""
    chunks = []
    headers = {"Authorization": f"Bearer {TOKENS[key]}"}
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line.removeprefix("data: ")))
            if len(chunks) == chunks_wanted:
                break
    return chunks


def test_the_ledger_counts_what_clients_were_told_streamed_whole_or_abandoned(keys_url):
    since = time.time()
    told = [
        _post(keys_url, "billing", "/llm", _ask("one two three four")).json()["usage"],
        json_chunks(_post(keys_url, "billing", "/llm", _ask("five six seven", stream=True)).text)[-1]["usage"],
        _post(keys_url, "billing", "/v1/chat/completions", _ask("eight nine", model="a")).json()["usage"],
        json_chunks(
            _post(
                keys_url,
                "billing",
                "/v1/chat/completions",
                _ask("ten eleven twelve", model="a", stream=True, stream_options={"include_usage": True}),
            ).text
        )[-1]["usage"],
        # Abandoned after two chunks (the engine has nothing more for it): the /llm client saw
        # usage on each chunk; the OpenAI client asked for none, so its count is its chunks.
        _read_then_leave(keys_url, "billing", "/llm", _ask("a b STALL c d", stream=True), 2)[-1]["usage"],
        {
            "prompt_tokens": 5,
            "completion_tokens": len(
                _read_then_leave(
                    keys_url, "billing", "/v1/chat/completions", _ask("e f STALL g h", model="a", stream=True), 2
                )
            ),
        },
    ]
    expected = {
        "requests": 6,
        "failed_requests": 2,  # the two abandoned streams are 499s
        "prompt_tokens": sum(u["prompt_tokens"] for u in told),
        "completion_tokens": sum(u["completion_tokens"] for u in told),
    }
    assert expected["completion_tokens"] > 0
    totals = until(
        lambda: (t := _usage(keys_url, key="billing", since=since))["requests"] >= 6 and t,
        15,
        "the ledger to record six requests",
    )
    assert totals == expected


def _replica_actors(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _replaced(killed: list[str]) -> bool:
    ingress, ledger = _replica_actors("ingress"), _replica_actors("usage-ledger")
    return len(ingress) == 2 and len(ledger) == 1 and not set(killed) & set(ingress + ledger)


def _healthy() -> bool:
    deployments = serve.status().applications[APP].deployments
    return (
        deployments["ingress"].replica_states.get("RUNNING") == 2
        and deployments["usage-ledger"].replica_states.get("RUNNING") == 1
    )


def test_the_ledger_survives_restarts_of_an_ingress_replica_and_of_the_ledger(keys_url):
    since = time.time()
    for _ in range(3):
        assert _post(keys_url, "open", "/llm", _ask()).status_code == 200
    before = until(
        lambda: (t := _usage(keys_url, key="open", since=since))["requests"] == 3 and t,
        15,
        "the ledger to record three requests",
    )
    killed = [_replica_actors("ingress")[0], _replica_actors("usage-ledger")[0]]
    for name in killed:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    until(lambda: _replaced(killed) and _healthy(), REPLICA_START_S, "Serve to replace the killed replicas")
    assert _usage(keys_url, key="open", since=since) == before
    assert _post(keys_url, "open", "/llm", _ask()).status_code == 200
    until(lambda: _usage(keys_url, key="open", since=since)["requests"] == 4, 15, "the new ledger replica to record")


def test_an_ingress_replica_stopped_gracefully_stores_the_rows_it_holds(serve_url, tmp_path_factory):
    """Rows wait in the ingress for `usage.flush_interval_s`; an ingress replaced by a redeploy
    stores them before it goes, in the ledger that replaces the old one at the same time."""
    from serve_app.tenancy.usage_store import UsageStore

    usage = ledger_in(tmp_path_factory.mktemp("held")).model_copy(update={"flush_interval_s": 60})
    deployment = {"num_cpus": 0.05, "num_replicas": 1}
    config = ClusterConfig.model_validate(
        {
            "usage": usage.model_dump(),
            "auth": {"keys": [_key("open")]},
            "ingress": {"num_cpus": 0.05},
            "models": [{"id": "fake-held", "source": {"path": "/nonexistent"}, "deployment": deployment}],
        }
    )
    store = UsageStore(usage.database)
    serve_fake(config, "held")
    try:
        assert _post(f"{serve_url}/held", "open", "/llm", _ask()).status_code == 200
        assert store.totals(None, None) == []  # held in the ingress, not yet sent
        # A redeploy replaces every replica, the ledger's too (Serve versions them by the app's
        # args, and a `serve.run` anew), so the old ingress must wait for the new ledger.
        serve_fake(
            config.model_copy(update={"ingress": config.ingress.model_copy(update={"max_tokens_limit": 99})}), "held"
        )
        stored = until(lambda: store.totals(None, None), 30, "the replaced ingress's row to be stored")
        assert [(row["key"], row["model"], row["requests"]) for row in stored] == [("open", "fake-held", 1)]
    finally:
        delete_app("held")
