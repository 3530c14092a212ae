"""One INFO line per request in the ingress replica's log, with id, key, model, status, token
counts and timings."""

import json
import secrets

import httpx
import pytest

from cluster.schema import ClusterConfig
from tests.conftest import delete_app, serve_fake
from tests.polling import until
from tests.serve_logs import fields_of, lines_of, log_line

pytestmark = pytest.mark.e2e

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_answered_request_is_logged_with_tokens_and_timings(client, stream):
    request_id = "log-" + secrets.token_hex(6)
    response = client.post(
        "/llm", json={"messages": FRANCE, "temperature": 0, "stream": stream}, headers={"x-request-id": request_id}
    )
    assert response.status_code == 200
    fields = fields_of(log_line(request_id))
    assert fields["endpoint"] == "/llm" and fields["key"] == "local" and fields["status"] == "200"
    assert fields["model"] == "smollm2-135m-instruct" and fields["finish"] == "stop"
    assert int(fields["prompt_tokens"]) > 0 and int(fields["completion_tokens"]) > 0
    assert float(fields["ttft"].removesuffix("ms")) <= float(fields["total"].removesuffix("ms"))


def test_refused_request_is_logged_with_its_status(client):
    request_id = "log-" + secrets.token_hex(6)
    client.post(
        "/v1/chat/completions", json={"model": "nope", "messages": FRANCE}, headers={"x-request-id": request_id}
    )
    fields = fields_of(log_line(request_id))
    assert fields["status"] == "404" and fields["endpoint"] == "/v1/chat/completions"


def _echo_config(logging: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "logging": logging,
            "usage": {"enabled": False},
            "models": [{"id": "echo", "source": {"path": "/models/echo"}, "deployment": {"num_cpus": 0.1}}],
        }
    )


@pytest.fixture(scope="module")
def json_logs(serve_url, fake_url):
    """An application that logs in JSON and leaves Serve's access log off, as by default."""
    serve_fake(_echo_config({"encoding": "JSON"}), "jsonlog")
    yield "jsonlog"
    delete_app("jsonlog")


def _answered(serve_url: str, app: str, text: str) -> tuple[str, str]:
    """An answered `/llm` request to the app: its id and, once written, its log line."""
    request_id = "logged-" + secrets.token_hex(6)
    response = httpx.post(
        f"{serve_url}/{app}/llm",
        json={"messages": [{"role": "user", "content": text}]},
        headers={"x-request-id": request_id},
        timeout=30,
    )
    assert response.status_code == 200
    return request_id, log_line(request_id, app=app)


def test_json_logs_carry_the_requestfields_of(serve_url, json_logs):
    request_id, line = _answered(serve_url, json_logs, "a b c")
    fields = json.loads(line)["llm_request"]
    assert fields["request_id"] == request_id and fields["model"] == "echo" and fields["status"] == 200
    assert fields["completion_tokens"] == 3 and fields["endpoint"] == "/llm"


def test_serve_access_log_is_off_unless_asked(serve_url, json_logs):
    """Our line per request is the access log; Serve's own line per call in each replica is written
    only with `logging.access_log: true` (the JSON application does not ask for it)."""
    serve_fake(_echo_config({"access_log": True}), "accesslog")
    try:

        def serve_lines(request_id: str, app: str) -> list[str]:
            return [line for line in lines_of(request_id, app) if "request id=" not in line]

        asked, _ = _answered(serve_url, "accesslog", "a b")
        until(
            lambda: len(serve_lines(asked, "accesslog")) >= 2, 15, "Serve's access lines of the ingress and the model"
        )
        quiet, _ = _answered(serve_url, json_logs, "a b")
        _answered(serve_url, json_logs, "a b")  # written after the first request's replicas were done with it
        assert serve_lines(quiet, json_logs) == []
    finally:
        delete_app("accesslog")
