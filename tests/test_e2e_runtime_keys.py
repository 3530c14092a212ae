"""Keys and tenants made, changed, rotated and revoked through the admin API while the cluster
serves: in effect on every ingress replica within a second, with no replica of any deployment
replaced; budgets of tokens and of spend held exactly under concurrency, per key and per tenant.
On the test engine with two ingress replicas, and once on the real model's engine."""

import hashlib
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from cluster.schema import ClusterConfig
from tests.conftest import API_KEY, delete_app, ledger_in, serve_fake
from tests.serve_logs import fields_of, log_line, replica_of

pytestmark = pytest.mark.e2e

APP = "runtime-keys"
ADMIN = "sk-admin-" + secrets.token_hex(8)
PRICE = {"prompt_per_million": 1_000_000, "completion_per_million": 2_000_000, "currency": "EUR"}
"""A unit of currency per prompt token and two per completion token: costs are whole numbers."""
PROPAGATION_S = 1.0
"""The promise: a change is in effect on every ingress replica within this long."""


@pytest.fixture(scope="module")
def app_url(serve_url, tmp_path_factory):
    deployment = {"num_cpus": 0.05, "num_replicas": 1}
    config = ClusterConfig.model_validate(
        {
            "usage": ledger_in(tmp_path_factory.mktemp(APP)).model_dump(),
            "ingress": {"num_replicas": 2, "num_cpus": 0.05},
            "auth": {
                "keys": [{"name": "ops", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "scopes": ["admin"]}]
            },
            "models": [
                {"id": "keyed-echo", "source": {"path": "/nonexistent"}, "deployment": deployment, "price": PRICE}
            ],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _admin(url: str, method: str, path: str, token: str = ADMIN, **kwargs) -> httpx.Response:
    return httpx.request(method, url + path, headers={"Authorization": f"Bearer {token}"}, timeout=30, **kwargs)


def _replicas(app: str) -> set[str]:
    """Every replica of the app's deployments, by its actor's name (which carries its id)."""
    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#")
    }


def _statuses_on_both_replicas(url: str, token: str, count: int = 16) -> set[int]:
    """The statuses of `count` concurrent chat requests with the token, which must have been
    spread over both ingress replicas."""
    ids = [f"rk-{secrets.token_hex(6)}" for _ in range(count)]
    body = {"messages": [{"role": "user", "content": "one two"}]}

    def ask(request_id: str) -> int:
        headers = {"Authorization": f"Bearer {token}", "x-request-id": request_id}
        return httpx.post(url + "/llm", json=body, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(count) as pool:
        statuses = set(pool.map(ask, ids))
    assert len({replica_of(request_id, APP) for request_id in ids}) == 2, "both ingress replicas took requests"
    return statuses


def _after_propagation(changed_at: float) -> None:
    """Waits out the promised propagation time from the change's answer: what is checked then is
    the promise itself, not a guess at when a replica heard of it."""
    time.sleep(max(0.0, changed_at + PROPAGATION_S - time.monotonic()))


def test_a_key_made_changed_rotated_and_revoked_at_runtime_takes_effect_on_every_replica(app_url):
    replicas = _replicas(APP)
    assert any("#key-registry#" in name for name in replicas)
    made = _admin(app_url, "POST", "/admin/keys", json={"name": "acme", "metadata": {"plan": "pro"}})
    assert made.status_code == 201, made.text
    first = made.json()["key"]
    _after_propagation(time.monotonic())
    assert _statuses_on_both_replicas(app_url, first) == {200}

    suspended = _admin(app_url, "PATCH", "/admin/keys/acme", json={"disabled": True})
    changed = time.monotonic()
    assert suspended.json()["disabled"] is True
    _after_propagation(changed)
    assert _statuses_on_both_replicas(app_url, first) == {401}
    _admin(app_url, "PATCH", "/admin/keys/acme", json={"disabled": False})

    rotated = _admin(app_url, "POST", "/admin/keys/acme/rotate", json={"grace_s": 3})
    changed = time.monotonic()
    second = rotated.json()["key"]
    _after_propagation(changed)
    assert _statuses_on_both_replicas(app_url, first) == {200}  # within the grace period
    assert _statuses_on_both_replicas(app_url, second) == {200}
    time.sleep(max(0.0, changed + 3 - time.monotonic()))
    assert _statuses_on_both_replicas(app_url, first) == {401}

    revoked = _admin(app_url, "DELETE", "/admin/keys/acme")
    changed = time.monotonic()
    assert revoked.status_code == 200
    _after_propagation(changed)
    assert _statuses_on_both_replicas(app_url, second) == {401}

    for index in range(16):  # 20 changes in all
        _admin(app_url, "POST", "/admin/keys", json={"name": f"k{index}"}).raise_for_status()
    assert _replicas(APP) == replicas, "no replica of any deployment was replaced"

    audit = _admin(app_url, "GET", "/admin/audit", params={"limit": 1000}).json()["data"]
    acme = [(entry["action"], entry["actor"]) for entry in reversed(audit) if entry["target"] == "acme"]
    assert acme == [
        ("key.create", "ops"),
        ("key.update", "ops"),
        ("key.update", "ops"),
        ("key.rotate", "ops"),
        ("key.delete", "ops"),
    ]
    assert first not in str(audit) and hashlib.sha256(first.encode()).hexdigest() not in str(audit)


def test_the_admin_key_api_refuses_what_it_must(app_url):
    assert _admin(app_url, "PATCH", "/admin/keys/ops", json={"disabled": True}).status_code == 409  # a config key
    assert _admin(app_url, "GET", "/admin/keys/nobody").status_code == 404
    bad = _admin(app_url, "POST", "/admin/keys", json={"name": "x", "models": ["no-such-model"]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    chat = _admin(app_url, "POST", "/admin/keys", json={"name": "chatter"}).json()["key"]
    refused = _admin(app_url, "GET", "/admin/keys", token=chat)
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    listed = _admin(app_url, "GET", "/admin/keys").json()["data"]
    assert {("ops", "config"), ("chatter", "api")} <= {(key["name"], key["source"]) for key in listed}
    assert all("key" not in key and "digest" not in key for key in listed)


def test_the_cli_drives_the_admin_api(app_url):
    env = {"LLM_ADMIN_KEY": ADMIN, "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cluster", "keys", *args, "--url", app_url], capture_output=True, text=True, env=env
        )

    made = cli("create", "from-cli", "--rpm", "100")
    assert made.returncode == 0, made.stderr
    secret = made.stderr.strip().splitlines()[-1]
    assert secret.startswith("sk-") and '"requests_per_minute": 100' in made.stdout
    _after_propagation(time.monotonic())
    assert _statuses_on_both_replicas(app_url, secret) == {200}
    assert cli("revoke", "from-cli").returncode == 0
    assert cli("show", "from-cli").returncode == 1


def test_a_key_made_at_runtime_is_served_by_the_real_engine_without_a_restart(llm_url):
    replicas = _replicas("llm")
    made = _admin(llm_url, "POST", "/admin/keys", token=API_KEY, json={"name": "runtime-" + secrets.token_hex(4)})
    assert made.status_code == 201, made.text
    name, secret = made.json()["name"], made.json()["key"]
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}
    answered = httpx.post(llm_url + "/llm", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=120)
    assert answered.status_code == 200 and "Paris" in answered.json()["choices"][0]["message"]["content"]
    assert _admin(llm_url, "DELETE", f"/admin/keys/{name}", token=API_KEY).status_code == 200
    refused = httpx.post(llm_url + "/llm", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert refused.status_code == 401
    assert _replicas("llm") == replicas


def test_a_budget_admits_exactly_the_reservations_that_fit_and_counts_what_was_used(app_url, tmp_path):
    from serve_app.apis.livepeer.protocol import LLMRequest
    from serve_app.apis.request_policy import for_engine, prompt_token_bound

    hold = tmp_path / "hold"
    body = {"messages": [{"role": "user", "content": f"WAIT {hold} one"}], "max_tokens": 4}
    chat = for_engine(LLMRequest.model_validate(body).to_chat_request(), "keyed-echo", 4)
    reservation = 4 + prompt_token_bound(chat)
    made = _admin(
        app_url, "POST", "/admin/keys", json={"name": "budgeted", "limits": {"tokens_per_day": 10 * reservation}}
    )
    secret = made.json()["key"]
    _after_propagation(time.monotonic())
    hold.touch()

    def ask(_: int) -> httpx.Response:
        return httpx.post(app_url + "/llm", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=60)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(ask, index) for index in range(32)]
        deadline = time.monotonic() + 30
        while sum(future.done() for future in futures) < 22:
            assert time.monotonic() < deadline, "the refusals did not come back while the admitted ones waited"
            time.sleep(0.05)
        held = _admin(app_url, "GET", "/admin/keys/budgeted").json()["budget_used"]["tokens_per_day"]
        assert held["used"] == 10 * reservation  # ten reservations, all in flight
        hold.unlink()
        responses = [future.result() for future in futures]
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(admitted), len(refused)) == (10, 22)
    assert "tokens for" in refused[0].json()["detail"]["msg"] and "resets at" in refused[0].json()["detail"]["msg"]
    assert refused[0].headers["x-ratelimit-remaining-tokens-day"] == "0"
    clients = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    spent = _admin(app_url, "GET", "/admin/keys/budgeted").json()["budget_used"]["tokens_per_day"]["used"]
    assert spent == clients

    def ledger() -> int:
        rows = _admin(app_url, "GET", "/admin/usage", params={"key": "budgeted"}).json()["data"]
        return sum(row["total_tokens"] for row in rows)

    deadline = time.monotonic() + 15  # the other ingress replica's rows arrive with its next flush
    while ledger() != clients:
        assert time.monotonic() < deadline, f"the ledger holds {ledger()} tokens, the clients were given {clients}"
        time.sleep(0.2)


def test_a_tenants_spend_budget_is_shared_by_its_keys_exactly_and_its_soft_budget_only_reports(app_url, tmp_path):
    """32 concurrent requests over two keys of one tenant on both ingress replicas, against a spend
    budget that fits 10 reservations: exactly 10 admitted; the tenant's spend equals the ledger's
    cost, which equals the clients' usage at the model's prices; requests past its soft budget are
    marked in the request log, never refused."""
    from serve_app.apis.livepeer.protocol import LLMRequest
    from serve_app.apis.request_policy import for_engine, prompt_token_bound

    hold = tmp_path / "hold"
    body = {"messages": [{"role": "user", "content": f"WAIT {hold} one"}], "max_tokens": 4}
    chat = for_engine(LLMRequest.model_validate(body).to_chat_request(), "keyed-echo", 4)
    reserved = prompt_token_bound(chat) * 1 + 4 * 2  # its reservation at the model's prices
    limits = {"spend_per_day": 10 * reserved, "soft": {"tokens_per_day": 1}}
    assert _admin(app_url, "POST", "/admin/tenants", json={"name": "acme", "limits": limits}).status_code == 201
    secrets_ = [
        _admin(app_url, "POST", "/admin/keys", json={"name": f"acme-{index}", "tenant": "acme"}).json()["key"]
        for index in range(2)
    ]
    _after_propagation(time.monotonic())
    hold.touch()
    ids = [f"tenant-{index}-{secrets.token_hex(4)}" for index in range(32)]

    def ask(index: int) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secrets_[index % 2]}", "x-request-id": ids[index]}
        return httpx.post(app_url + "/llm", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(ask, index) for index in range(32)]
        deadline = time.monotonic() + 30
        while sum(future.done() for future in futures) < 22:
            assert time.monotonic() < deadline, "the refusals did not come back while the admitted ones waited"
            time.sleep(0.05)
        held = _admin(app_url, "GET", "/admin/tenants/acme").json()["budget_used"]["spend_per_day"]
        assert held["used"] == 10 * reserved  # ten reservations, all in flight
        hold.unlink()
        responses = [future.result() for future in futures]
    admitted = [index for index, r in enumerate(responses) if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(admitted), len(refused)) == (10, 22)
    assert {index % 2 for index in admitted} == {0, 1}, "both keys drew on the tenant's budget"
    message = refused[0].json()["detail"]["msg"]
    assert message.startswith("tenant 'acme' has used or reserved") and f"of its {10 * reserved} EUR" in message

    def cost(usage: dict) -> float:
        return usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2

    clients = sum(cost(responses[index].json()["usage"]) for index in admitted)
    shown = _admin(app_url, "GET", "/admin/tenants/acme").json()
    assert shown["keys"] == ["acme-0", "acme-1"] and shown["budget_used"]["spend_per_day"]["used"] == clients
    assert shown["budget_used"]["soft_tokens_per_day"]["used"] > 1
    passed = [fields_of(log_line(ids[index], APP)) for index in admitted]
    assert all(line["tenant"] == "acme" and float(line["cost"]) > 0 for line in passed)
    assert all(line["soft_budgets"] == "tenant:acme/soft/tokens_per_day" for line in passed)

    def ledger() -> dict | None:
        usage = _admin(app_url, "GET", "/admin/usage", params={"tenant": "acme", "group_by": "tenant"}).json()
        return usage["data"][0] if usage["data"] else None

    deadline = time.monotonic() + 15  # the other ingress replica's rows arrive with its next flush
    while (row := ledger()) is None or row["cost"] != clients:
        assert time.monotonic() < deadline, f"the ledger holds {row}, the clients were given {clients}"
        time.sleep(0.2)
    assert row["requests"] == 10 and row["tenant"] == "acme"

    suspended = _admin(app_url, "PATCH", "/admin/tenants/acme", json={"disabled": True})
    assert suspended.status_code == 200
    _after_propagation(time.monotonic())
    assert _statuses_on_both_replicas(app_url, secrets_[0]) == {401}
    assert _admin(app_url, "DELETE", "/admin/tenants/acme").status_code == 409  # its keys still belong to it
