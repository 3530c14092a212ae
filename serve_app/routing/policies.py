"""A model's routing policy (`routing:` in its config) as the Serve option that picks the request
router its callers run (`request_router_config`); none keeps Serve's own.

The request router runs where the model is called from, the ingress, and reads the call's
arguments (vLLM's request for the route) and options (its `session_id`). That is why a colocated
model, reached only through Serve's HTTP proxy, cannot have a policy (refused by the config)."""

from typing import Any

# Ray's stable name, `ray.serve.llm.request_router.PrefixCacheAffinityRouter`, is a bare subclass
# of this one (tests/test_routing_policies.py holds it so) whose package imports Ray Serve LLM's
# configs, and with them pyarrow, which nothing else here needs.
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.serve.config import RequestRouterConfig

from cluster.schema import ModelConfig
from serve_app.routing.session import SessionAffinityRouter


class PromptPrefixRouter(PrefixCacheAffinityRouter):
    """Ray's router, reading every API's request: Ray's reads `messages` or `prompt` and raises on
    any other, which Serve logs and leaves unrouted until the request times out. The Responses
    and embeddings requests carry `input`; one with no text (token ids to detokenize) matches
    nothing and is routed by load."""

    def _extract_text_from_request(self, pending_request) -> str:
        for arg in pending_request.args:
            for name in ("messages", "prompt", "input"):
                value = getattr(arg, name, None)
                if value is not None:
                    return self._normalize_prompt_to_string(value)
        return ""


def request_router_options(model: ModelConfig) -> dict[str, Any]:
    """The model deployment's `request_router_config`, or nothing for Serve's default router."""
    routing = model.routing
    if routing is None:
        return {}
    if routing.policy == "session":
        config = RequestRouterConfig(
            request_router_class=SessionAffinityRouter,
            request_router_kwargs={
                "imbalanced_threshold": routing.imbalanced_threshold,
                "virtual_nodes": routing.virtual_nodes,
            },
        )
    else:
        eviction = routing.eviction
        config = RequestRouterConfig(
            request_router_class=PromptPrefixRouter,
            request_router_kwargs={
                "imbalanced_threshold": routing.imbalanced_threshold,
                "match_rate_threshold": routing.match_rate_threshold,
                # Always on: the record lives in one actor per model and would grow without end.
                "do_eviction": True,
                "eviction_threshold_chars": eviction.threshold_chars,
                "eviction_target_chars": eviction.target_chars,
                "eviction_interval_secs": eviction.interval_s,
            },
        )
    return {"request_router_config": config}
