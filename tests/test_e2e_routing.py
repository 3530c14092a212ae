"""Routing policies through HTTP on the test engine: one application with two models of two
replicas each, one routed by session and one by prefix. The test engine names the replica that
answered in `system_fingerprint`."""

import httpx
import pytest

from cluster.schema import ClusterConfig
from tests.conftest import delete_app, serve_fake

pytestmark = pytest.mark.e2e

APP = "routing"


@pytest.fixture(scope="module")
def routing_url(serve_url):
    deployment = {"num_cpus": 0.05, "num_replicas": 2}
    config = ClusterConfig.model_validate(
        {
            "usage": {"enabled": False},
            "models": [
                {
                    "id": "sticky",
                    "source": {"path": "/models/sticky"},
                    "deployment": deployment,
                    "routing": {"policy": "session"},
                },
                {
                    "id": "prefixed",
                    "source": {"path": "/models/prefixed"},
                    "deployment": deployment,
                    "routing": {"policy": "prefix_cache"},
                },
            ],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}"
    delete_app(APP)


def _replica(client: httpx.Client, model: str, messages: list[dict], headers: dict | None = None, **body) -> str:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": messages} | body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["system_fingerprint"]


def test_every_turn_of_a_session_lands_on_one_replica_and_sessions_spread(routing_url):
    """16 sessions, half by the `x-session-id` header and half by the `user` field, three turns
    each, interleaved: Serve's default router would scatter a session's turns (each turn on the
    same replica as the first has odds of 1 in 4), and 16 sessions all on one replica have odds
    of 1 in 30,000."""
    sessions = {f"conversation-{index}": index % 2 == 0 for index in range(16)}
    landed: dict[str, set[str]] = {session: set() for session in sessions}
    with httpx.Client(base_url=routing_url, timeout=30) as client:
        for turn in range(3):
            for session, by_header in sessions.items():
                messages = [{"role": "user", "content": f"turn {turn} of {session}"}]
                if by_header:
                    replica = _replica(client, "sticky", messages, headers={"x-session-id": session})
                else:
                    replica = _replica(client, "sticky", messages, user=session)
                landed[session].add(replica)
    assert all(len(replicas) == 1 for replicas in landed.values()), landed
    assert len(set().union(*landed.values())) == 2


def test_requests_sharing_a_long_prefix_land_on_the_replica_that_served_it(routing_url):
    """A second long prompt, unlike the first from its first character, goes to the replica
    that has seen less (the other one), and its followers follow it: affinity per prefix, the
    load spread over both."""
    prompts = {
        name: f"{name} " + " ".join(f"{name}-rule-{index}" for index in range(200)) for name in ("alpha", "omega")
    }
    landed: dict[str, list[str]] = {name: [] for name in prompts}
    with httpx.Client(base_url=routing_url, timeout=30) as client:
        for name, prompt in prompts.items():
            for question in range(4):
                messages = [{"role": "system", "content": prompt}, {"role": "user", "content": f"question {question}"}]
                landed[name].append(_replica(client, "prefixed", messages))
    assert [len(set(replicas)) for replicas in landed.values()] == [1, 1], landed
    assert landed["alpha"][0] != landed["omega"][0]
