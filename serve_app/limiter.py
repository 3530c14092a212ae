"""Where rate-limit state lives: one `RateLimiter` replica for the whole application, which every
ingress replica asks before a keyed request does any engine work.

One replica, not counters per ingress replica, because a limit must hold for the cluster: with
two ingress replicas, N requests per minute must admit N, not 2N. A Serve deployment, not Redis,
because Ray is already there and one in-memory call costs well under a millisecond; the price is
that a restarted limiter forgets the last minute (limits reopen for at most one window). Keys
without limits never make the call.
"""

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from cluster.schema import ApiKey
from serve_app import fire_and_forget
from serve_app.auth import Caller
from serve_app.errors import BadRequest, Overloaded, RateLimited
from serve_app.rate_limits import Decision, RateLimits

logger = logging.getLogger("ray.serve")

ACQUIRE_TIMEOUT_S = 5.0

LIMITER_OPTIONS = {
    "name": "rate-limiter",
    "num_replicas": 1,
    "max_ongoing_requests": 4096,
    "ray_actor_options": {"num_cpus": 0},
}


class RateLimiter:
    """Its methods never await: each admission is decided in one step, so concurrent calls from
    many ingress replicas cannot interleave inside one."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._limits = RateLimits({key.name: key.limits for key in keys})

    async def acquire(self, key: str, reserve_tokens: int) -> Decision:
        return self._limits.acquire(key, reserve_tokens)

    async def release(self, lease_id: str, tokens_used: int) -> None:
        self._limits.release(lease_id, tokens_used)


class LimitGate:
    """The ingress's side: admits a request or raises the 429 (or 400) that says why not."""

    def __init__(self, limiter: DeploymentHandle | None) -> None:
        self._limiter = limiter

    async def admit(self, caller: Caller, reserve_tokens: int) -> Decision | None:
        key = caller.key
        if key is None or not key.limits.any or self._limiter is None:
            return None
        per_minute = key.limits.tokens_per_minute
        if per_minute is not None and reserve_tokens > per_minute:
            raise BadRequest(
                f"max_tokens is {reserve_tokens}, more than API key {key.name!r} may use in a minute "
                f"({per_minute} tokens); lower max_tokens"
            )
        try:
            decision = await asyncio.wait_for(
                self._limiter.acquire.remote(key.name, reserve_tokens), ACQUIRE_TIMEOUT_S
            )
        except Exception:
            logger.exception("rate limiter call failed")
            raise Overloaded("the rate limiter is unavailable; retry shortly") from None
        if decision.refusal is not None:
            raise RateLimited(decision.refusal, decision.retry_after_s, decision.headers)
        return decision

    def release(self, decision: Decision, tokens_used: int) -> None:
        """Fire and forget: the client's answer never waits for the bookkeeping."""
        if self._limiter is not None and decision.lease_id is not None:
            fire_and_forget.send(self._limiter, "release", decision.lease_id, tokens_used)
