"""Routing policies without a cluster: the config's `routing` and `engine_signals` and their
refusals, the request router each policy installs with its arguments, the hash ring that places
sessions (stable, spread, moving little when replicas change), the overload rule, and where the
ingress reads a request's session."""

import ast
import contextvars
import inspect
from collections import Counter
from pathlib import Path

import pytest
import ray.serve
from pydantic import ValidationError
from ray.serve.context import _RequestContext, _serve_request_context
from ray.serve.request_router import RequestRouter

from cluster.schema import ClusterConfig, ModelConfig
from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.routing.policies import PrefixCacheAffinityRouter, request_router_options
from serve_app.routing.session import HashRing, SessionAffinityRouter, overloaded, session_of


def _model(**fields) -> ModelConfig:
    return ModelConfig.model_validate({"id": "m", "source": {"path": "/m"}} | fields)


def _cluster(model: dict, colocate: bool) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {"ingress": {"colocate": colocate}, "models": [{"id": "m", "source": {"path": "/m"}} | model]}
    )


def test_no_routing_keeps_serves_router():
    assert request_router_options(_model()) == {}


def test_prefix_cache_installs_rays_router_with_its_arguments_and_eviction_always_on():
    routing = {
        "policy": "prefix_cache",
        "imbalanced_threshold": 4,
        "eviction": {"threshold_chars": 1000, "target_chars": 800},
    }
    config = request_router_options(_model(routing=routing))["request_router_config"]
    assert issubclass(config.get_request_router_class(), PrefixCacheAffinityRouter)
    assert config.request_router_kwargs == {
        "imbalanced_threshold": 4,
        "match_rate_threshold": 0.1,
        "do_eviction": True,
        "eviction_threshold_chars": 1000,
        "eviction_target_chars": 800,
        "eviction_interval_secs": 10,
    }


def test_every_kwarg_passed_to_the_prefix_router_is_one_it_takes():
    config = request_router_options(_model(routing={"policy": "prefix_cache"}))["request_router_config"]
    taken = inspect.signature(PrefixCacheAffinityRouter.initialize_state).parameters
    assert set(config.request_router_kwargs) <= set(taken)


def test_the_prefix_router_imported_is_the_one_behind_rays_stable_name():
    """`ray.serve.llm.request_router.PrefixCacheAffinityRouter` cannot be imported here (its
    package needs pyarrow): its source must still be a bare subclass of the class we use."""
    tree = ast.parse((Path(ray.serve.__file__).parent / "llm" / "request_router.py").read_text())
    [stable] = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "PrefixCacheAffinityRouter"
    ]
    [base] = stable.bases
    imported = {
        alias.asname: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname
    }
    assert imported[base.id] == PrefixCacheAffinityRouter.__module__
    assert [type(statement) for statement in stable.body] in ([ast.Expr, ast.Pass], [ast.Pass])


def test_session_installs_our_router_with_its_arguments():
    routing = {"policy": "session", "imbalanced_threshold": 3, "virtual_nodes": 20}
    config = request_router_options(_model(routing=routing))["request_router_config"]
    router = config.get_request_router_class()
    assert router.__name__ == "SessionAffinityRouter" and issubclass(router, RequestRouter)
    assert config.request_router_kwargs == {"imbalanced_threshold": 3, "virtual_nodes": 20}
    assert set(config.request_router_kwargs) <= set(
        inspect.signature(SessionAffinityRouter.initialize_state).parameters
    )


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"policy": "round_robin"}, "does not match any of the expected tags: 'prefix_cache', 'session'"),
        ({"policy": "session", "match_rate_threshold": 0.5}, "routing.session.match_rate_threshold"),
        ({"policy": "prefix_cache", "match_rate_threshold": 2}, "less than or equal to 1"),
        (
            {"policy": "prefix_cache", "eviction": {"threshold_chars": 10, "target_chars": 20}},
            "target_chars (20) is above threshold_chars (10)",
        ),
        ({}, "Unable to extract tag using discriminator 'policy'"),
    ],
)
def test_a_bad_routing_is_refused_naming_it(routing, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _model(routing=routing)


def test_a_colocated_model_takes_no_routing_policy_nor_engine_signals():
    with pytest.raises(ValidationError, match="routed by Serve's HTTP proxy"):
        _cluster({"routing": {"policy": "prefix_cache"}}, colocate=True)
    engine = {"deployment": {"autoscaling": {"engine_signals": {}}}}
    with pytest.raises(ValidationError, match="engine_signals needs the model in a deployment of its own"):
        _cluster(engine, colocate=True)
    assert _cluster({"routing": {"policy": "session"}} | engine, colocate=False).models[0].routing.policy == "session"


def test_engine_signals_and_a_request_target_are_one_or_the_other():
    with pytest.raises(ValidationError, match="either target_ongoing_requests"):
        _model(deployment={"autoscaling": {"target_ongoing_requests": 4, "engine_signals": {}}})
    with pytest.raises(ValidationError, match="greater than 10"):
        _model(deployment={"autoscaling": {"look_back_period_s": 5}})
    with pytest.raises(ValidationError, match="max_kv_cache_usage"):
        _model(deployment={"autoscaling": {"engine_signals": {"max_kv_cache_usage": 1.5}}})


def test_a_session_keeps_its_replica_and_sessions_spread_over_the_replicas():
    ring = HashRing(["a", "b", "c"], points=100)
    sessions = [f"session-{index}" for index in range(3000)]
    homes = [ring.node(session) for session in sessions]
    assert homes == [HashRing(["c", "a", "b"], points=100).node(session) for session in sessions]
    assert all(700 < count < 1300 for count in Counter(homes).values()), Counter(homes)


def test_a_replica_added_takes_only_its_share_and_one_gone_moves_only_its_own():
    sessions = [f"session-{index}" for index in range(3000)]
    before = {session: HashRing(["a", "b", "c"], 100).node(session) for session in sessions}
    after = {session: HashRing(["a", "b", "c", "d"], 100).node(session) for session in sessions}
    moved = [session for session in sessions if before[session] != after[session]]
    assert all(after[session] == "d" for session in moved) and 500 < len(moved) < 1000
    gone = {session: HashRing(["a", "b"], 100).node(session) for session in sessions}
    assert all(gone[session] == before[session] for session in sessions if before[session] != "c")


def test_an_empty_ring_places_nothing():
    assert HashRing([], points=100).node("session") is None


def test_a_sessions_replica_is_overloaded_past_the_threshold_over_the_least_loaded():
    assert not overloaded("a", {"a": 10, "b": 2}, imbalanced_threshold=8)
    assert overloaded("a", {"a": 11, "b": 2}, imbalanced_threshold=8)
    assert not overloaded("a", {"a": 11, "b": None}, imbalanced_threshold=8)
    assert not overloaded("a", {"a": None, "b": 0}, imbalanced_threshold=8)


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]} | fields
    )


def _in_request(session_id: str, request: ChatCompletionRequest) -> str:
    def read() -> str:
        _serve_request_context.set(_RequestContext(session_id=session_id))
        return session_of(request)

    return contextvars.copy_context().run(read)


def test_the_session_header_comes_first_then_the_user_field():
    assert _in_request("from-header", _chat(user="alice")) == "from-header"
    assert _in_request("", _chat(user="alice")) == "alice"
    assert _in_request("", _chat()) == ""
