"""The rate limiter killed while a limited key's requests arrive, through HTTP on a real Ray
cluster and the test engine, once per policy (`auth.limiter.on_failure`). `closed`: its replica is
killed, and the key's requests get 503 with Retry-After, in each endpoint's shape, until Serve has
replaced it. `open`: its actor is killed (the replica then fails its health checks), and the key's
requests are served without limits meanwhile, each counted. Either way the new limiter has
forgotten the minute, limits the key again, and (`closed`, where no request went unlimited) holds
the budget's use read back from the ledger. Prints how long the limiter took to come back."""

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from cluster.schema import ClusterConfig
from tests.conftest import delete_app, ledger_in, serve_fake
from tests.polling import until
from tests.test_e2e_observability import scrape, total

pytestmark = pytest.mark.e2e

TOKEN = f"sk-limited-{secrets.token_hex(8)}"
RPM = 3
MONTH = 1_000_000
OUTAGE_MESSAGE = "the rate limiter is unavailable; retry shortly"


@dataclass(frozen=True)
class App:
    name: str
    url: str
    database: Path

    @property
    def key(self) -> str:
        return f"limited-{self.name}"


@pytest.fixture(scope="module")
def app(request, serve_url, tmp_path_factory):
    """One small application per policy, the policy's name being the application's, with as few
    replicas to start as it can: the model's engine in the ingress, and no ledger for `open` (the
    rows of the requests it serves without limits would race the new limiter's seed, so its
    budgets are not checked)."""
    name = request.param
    usage = ledger_in(tmp_path_factory.mktemp(name)).model_copy(
        update={"flush_interval_s": 0.2, "enabled": name == "closed"}
    )
    limits = {"requests_per_minute": RPM, "tokens_per_month": MONTH}
    config = ClusterConfig.model_validate(
        {
            "usage": usage.model_dump(),
            "ingress": {"colocate": True},
            "auth": {
                "runtime_keys": False,
                "limiter": {"on_failure": name},
                "keys": [
                    {"name": f"limited-{name}", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "limits": limits}
                ],
            },
            "models": [
                {
                    "id": "fake-limited",
                    "source": {"path": "/nonexistent"},
                    "deployment": {"num_cpus": 0.05, "num_replicas": 1},
                }
            ],
        }
    )
    serve_fake(config, name)
    yield App(name, f"{serve_url}/{name}", Path(usage.database.removeprefix("sqlite:///")))
    delete_app(name)


def _ask(app: App, index: int) -> httpx.Response:
    """`/llm` and OpenAI's in turn."""
    body = {"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if index % 2:
        body |= {"model": "fake-limited"}
        return httpx.post(f"{app.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    return httpx.post(f"{app.url}/llm", json=body, headers=headers, timeout=30)


def _use_the_minute(app: App, first: int = 0) -> int:
    """The key's requests up to its limit, then one refused; the tokens they used, as told."""
    used = 0
    for index in range(first, RPM):
        response = _ask(app, index)
        assert response.status_code == 200, response.text
        assert response.headers["x-ratelimit-remaining-requests"] == str(RPM - 1 - index)
        used += response.json()["usage"]["total_tokens"]
    assert _ask(app, RPM).status_code == 429
    return used


def _month_left(app: App) -> int:
    """What a refused request says is left of the key's month, once its requests have settled."""
    refused = _ask(app, 0)
    assert refused.status_code == 429, refused.text
    return int(refused.headers["x-ratelimit-remaining-tokens-month"])


def _stored_rows(app: App) -> int:
    with sqlite3.connect(app.database) as db:
        return db.execute("select count(*) from usage where key = ?", (app.key,)).fetchone()[0]


def _limiter_replicas(app: App) -> list[str]:
    prefix = f"SERVE_REPLICA::{app.name}#rate-limiter#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _replica_logs(app: App) -> list[str]:
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{app.name}_*.log") for line in path.read_text().splitlines()]


def _until_answered(app: App, answered, killed_at: float) -> list[httpx.Response]:
    """The key's requests, one after another, until `answered` says the limiter decided one."""
    responses: list[httpx.Response] = []

    def ask() -> bool:
        responses.append(_ask(app, len(responses)))
        return answered(responses[-1])

    until(ask, 60, "the limiter to answer again", every_s=0.05)
    print(f"\n{app.name}: the limiter answered again {time.monotonic() - killed_at:.1f} s after it was killed")
    return responses


def _outage_logged_once(app: App) -> None:
    lines = until(
        lambda: (
            (log := _replica_logs(app)) and any("the rate limiter answers again after" in line for line in log) and log
        ),
        15,
        "the ingress to log the limiter's return",
    )
    [warning] = [line for line in lines if "the rate limiter is unavailable (" in line]
    assert warning.startswith("WARNING") and f"auth.limiter.on_failure: {app.name}" in warning


def _leading(responses: list[httpx.Response], status: int) -> int:
    """How many of the first answers have this status (the dying limiter's own refusals)."""
    return next(index for index, response in enumerate(responses) if response.status_code != status)


@pytest.mark.parametrize("app", ["closed"], indirect=True)
def test_closed_refuses_with_503_until_serve_replaces_the_killed_replica(app):
    used = _use_the_minute(app)
    until(lambda: _month_left(app) == MONTH - used, 15, "the minute's requests to settle")
    until(lambda: _stored_rows(app) == RPM, 15, "the ledger to store the minute's rows")

    [replica] = _limiter_replicas(app)
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    responses = _until_answered(app, lambda response: response.status_code == 200, time.monotonic())

    outage = range(_leading(responses, 429), len(responses) - 1)
    assert len(outage) >= 2 and {index % 2 for index in outage} == {0, 1}, "both endpoints were refused"
    for index in outage:
        refused = responses[index]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        if index % 2:
            error = refused.json()["error"]
            assert (error["message"], error["type"], error["code"]) == (OUTAGE_MESSAGE, "overloaded_error", 503)
            assert refused.json()["request_id"]
        else:
            detail = refused.json()["detail"]
            assert detail["msg"] == OUTAGE_MESSAGE and detail["request_id"]
    # The new limiter forgot the minute, and limits the key again.
    served = responses[-1]
    assert served.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    used_after = served.json()["usage"]["total_tokens"] + _use_the_minute(app, first=1)
    # It read the month's use back from the ledger: what was used before the kill still counts.
    until(lambda: _month_left(app) == MONTH - used - used_after, 15, "the new limiter's requests to settle")
    _outage_logged_once(app)


@pytest.mark.parametrize("app", ["open"], indirect=True)
def test_open_serves_without_limits_until_the_replaced_limiter_limits_again(app, metrics_url):
    _use_the_minute(app)
    # The actor alone: its replica lives on, failing its health checks until Serve replaces it.
    limits = serve.get_deployment_handle("rate-limiter", app.name).actor.remote().result()
    ray.kill(limits)
    responses = _until_answered(
        app,
        lambda response: response.status_code == 200 and "x-ratelimit-remaining-requests" in response.headers,
        time.monotonic(),
    )

    unlimited = responses[_leading(responses, 429) : -1]
    assert unlimited, "requests were served while the limiter was down"
    for response in unlimited:
        assert response.status_code == 200, response.text
        assert not any(name.startswith("x-ratelimit-") for name in response.headers)
    assert responses[-1].headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    _use_the_minute(app, first=1)  # and limited again
    until(
        lambda: total(scrape(metrics_url), "ray_llm_requests_admitted_unlimited_total", key=app.key) == len(unlimited),
        30,
        "llm_requests_admitted_unlimited to count the requests served without limits",
    )
    _outage_logged_once(app)
