"""Every request is recorded once, as what it was, however it ends: in the log line, the metrics
and the usage ledger, through HTTP on a real Ray cluster over the test engine."""

import hashlib
import os
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import httpx
import pytest
import ray
from ray import serve

from cluster.schema import ClusterConfig
from tests.conftest import delete_app, ledger_in, serve_fake
from tests.polling import until
from tests.serve_logs import errors_since, fields_of, log_line
from tests.sse import json_chunks
from tests.test_e2e_observability import scrape, total

pytestmark = pytest.mark.e2e

APP = "lifecycle"
MODEL = "lifecycle-echo"
TOKENS = {name: f"sk-{name}-{secrets.token_hex(8)}" for name in ("limited", "admin")}


def _key(name: str, **fields) -> dict:
    return {"name": name, "sha256": hashlib.sha256(TOKENS[name].encode()).hexdigest()} | fields


@pytest.fixture(scope="module")
def app_url(serve_url, tmp_path_factory):
    config = ClusterConfig.model_validate(
        {
            "usage": ledger_in(tmp_path_factory.mktemp(APP)).model_dump(),
            "ingress": {"num_cpus": 0.05},
            "auth": {
                "keys": [
                    # Any limit puts the rate limiter on the key's path.
                    _key("limited", limits={"requests_per_minute": 10_000}),
                    _key("admin", scopes=["chat", "admin"]),
                ]
            },
            "models": [{"id": MODEL, "source": {"path": "/nonexistent"}, "deployment": {"num_cpus": 0.05}}],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _headers(key: str, request_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[key]}", "x-request-id": request_id}


def _ledger(url: str, key: str) -> dict:
    response = httpx.get(url + "/admin/usage", params={"key": key}, headers=_headers("admin", "usage-read"), timeout=30)
    assert response.status_code == 200, response.text
    rows = response.json()["data"]
    return {"requests": sum(r["requests"] for r in rows), "failed_requests": sum(r["failed_requests"] for r in rows)}


def test_a_livepeer_stream_that_fails_midway_is_recorded_as_the_failure(app_url, metrics_url):
    before = _ledger(app_url, "limited")
    failures = {"endpoint": "/llm", "key": "limited", "model": MODEL, "status": "500"}
    failed_before = total(scrape(metrics_url), "ray_llm_requests_total", **failures)
    request_id = "midway-" + secrets.token_hex(6)
    body = {"messages": [{"role": "user", "content": "one two FAIL MIDSTREAM three four"}], "stream": True}
    response = httpx.post(app_url + "/llm", json=body, headers=_headers("limited", request_id), timeout=30)

    assert response.status_code == 200  # the failure came after the stream began
    *_, last = json_chunks(response.text)
    assert last["choices"][0]["finish_reason"] == "error" and request_id in last["error"]["message"]
    fields = fields_of(log_line(request_id, app=APP))
    assert (fields["status"], fields["finish"]) == ("500", "error")
    # The row is written once the stream has ended, which the client may see first.
    after = until(
        lambda: (now := _ledger(app_url, "limited"))["requests"] > before["requests"] and now,
        15,
        "the stream's row in the ledger",
    )
    assert after == {"requests": before["requests"] + 1, "failed_requests": before["failed_requests"] + 1}
    until(
        lambda: total(scrape(metrics_url), "ray_llm_requests_total", **failures) == failed_before + 1,
        30,
        "the failed stream in the metrics",
    )


def _limiter_pid() -> int:
    limiter = serve.get_deployment_handle("rate-limiter", APP)
    actor = limiter.actor.remote().result(timeout_s=30)
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


@contextmanager
def _paused(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_client_that_leaves_while_the_limiter_is_asked_is_recorded_and_not_left_in_flight(app_url, metrics_url):
    in_flight = {"model": MODEL}
    request_id = "leaves-" + secrets.token_hex(6)
    body = {"messages": [{"role": "user", "content": "one two"}]}
    with _paused(_limiter_pid()):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(app_url + "/llm", json=body, headers=_headers("limited", request_id), timeout=1.0)
        # Recorded while the limiter is still unanswering: the departure ended the request.
        fields = fields_of(log_line(request_id, app=APP, timeout_s=4))
    assert fields["status"] == "499" and fields["model"] == MODEL
    until(
        lambda: (
            total(scrape(metrics_url), "ray_llm_requests_in_flight", **in_flight) == 0
            and total(scrape(metrics_url), "ray_llm_requests_total", status="499", model=MODEL) >= 1
        ),
        30,
        "no request of the model left in flight",
    )
    answered = httpx.post(app_url + "/llm", json=body, headers=_headers("limited", "after-" + request_id), timeout=30)
    assert answered.status_code == 200


@pytest.mark.parametrize(
    "path, endpoint",
    [
        ("/v1/models", "/v1/models"),
        (f"/v1/models/{MODEL}", "/v1/models"),
        ("/version", "/version"),
        ("/hardware/info", "/hardware/info"),
        ("/admin/usage", "/admin/usage"),
    ],
)
def test_reads_are_logged_too_an_admin_read_of_billing_data_included(app_url, path, endpoint):
    request_id = "read-" + secrets.token_hex(6)
    response = httpx.get(app_url + path, headers=_headers("admin", request_id), timeout=30)
    assert response.status_code == 200, response.text
    fields = fields_of(log_line(request_id, app=APP))
    assert (fields["endpoint"], fields["status"], fields["key"]) == (endpoint, "200", "admin")


def test_an_unexpected_error_is_answered_in_shape_and_logged_once(app_url):
    now = datetime.now()
    started = now.replace(microsecond=now.microsecond // 1000 * 1000)  # as precise as the log's times
    request_id = "bug-" + secrets.token_hex(6)
    body = {"messages": [{"role": "user", "content": "NO CHOICES please"}]}
    response = httpx.post(app_url + "/llm", json=body, headers=_headers("limited", request_id), timeout=30)

    assert response.status_code == 500
    assert response.json() == {"detail": {"msg": f"internal error (request id {request_id})", "request_id": request_id}}
    assert fields_of(log_line(request_id, app=APP))["status"] == "500"
    # Serve logs a request that raised out of the app after its answer went out: once the next
    # request's line is written, any such line of this one's has been written too.
    after = "after-" + request_id
    httpx.post(
        app_url + "/llm",
        json={"messages": [{"role": "user", "content": "a b"}]},
        headers=_headers("limited", after),
        timeout=30,
    )
    log_line(after, app=APP)
    errors = errors_since(APP, started)
    assert len(errors) == 1 and request_id in errors[0], errors
