"""Where rate-limit state lives: one actor for the whole application, which every ingress replica
asks before a keyed request does any engine work.

One holder, not counters per ingress replica, because a limit must hold for the cluster: with two
ingress replicas, N requests per minute must admit N, not 2N. A Ray actor, not Redis, because Ray
is already there and one in-memory call is cheap (docs/design.md). The actor is owned by the one
replica of the `rate-limiter` Serve deployment, so Serve manages its life (started with the
application, replaced if it fails, gone with it), while ingress replicas call the actor directly:
a plain actor call costs less than a Serve handle call. A restarted
limiter forgets the last minute (limits reopen for at most one window). Keys without limits never
make the call.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from cluster.schema import ApiKey, KeyLimits
from serve_app.errors import BadRequest, Overloaded, RateLimited
from serve_app.tenancy.budgets import PERIODS, Budgets, period_of
from serve_app.tenancy.keys import Caller
from serve_app.tenancy.quotas import Decision, RateLimits
from serve_app.tenancy.usage_store import UsageStore

logger = logging.getLogger("ray.serve")

ACQUIRE_TIMEOUT_S = 5.0

LIMITER_OPTIONS = {
    "name": "rate-limiter",
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0},
}


@ray.remote(num_cpus=0, max_restarts=0)
class _Limits:
    """Its methods never await: each admission is decided in one step, so concurrent calls from
    many ingress replicas cannot interleave inside one."""

    def __init__(self, database: str | None) -> None:
        self._limits = RateLimits()
        if database is not None:
            _seed(self._limits.budgets, database)

    async def acquire(
        self, key: str, limits: KeyLimits, reserve_tokens: int, lease_id: str, budget_tokens: int
    ) -> Decision:
        return self._limits.acquire(key, limits, reserve_tokens, lease_id, budget_tokens)

    async def budget_used(self, key: str, limits: KeyLimits) -> dict:
        return self._limits.budgets.used(key, limits)

    async def release(self, lease_id: str, tokens_used: int) -> None:
        self._limits.release(lease_id, tokens_used)

    async def ping(self) -> None:
        return None


def _seed(budgets: Budgets, database: str) -> None:
    """A limiter that starts (or restarts) counts each budget's period from what the ledger holds.
    Rows an ingress replica still holds (at most a flush interval's) are not yet there."""
    store = UsageStore(database)
    now = time.time()
    for kind in PERIODS:
        label, start, _ = period_of(kind, now)
        for row in store.totals(since=start, until=None, group_by=("key",)):
            if row["key"] is not None:
                budgets.seed(row["key"], kind, label, row["total_tokens"])


class RateLimiter:
    """The Serve deployment that owns the limits actor: its health is the actor's."""

    def __init__(self, database: str | None = None) -> None:
        self._actor = _Limits.remote(database)

    async def actor(self) -> ActorHandle:
        return self._actor

    async def check_health(self) -> None:
        await self._actor.ping.remote()


@dataclass(frozen=True)
class Lease:
    """A granted lease and the actor that holds it, which is the one to release it (the ingress
    may have moved on to a new actor meanwhile)."""

    decision: Decision
    actor: ActorHandle


class LimitGate:
    """The ingress's side: admits a request or raises the 429 (or 400) that says why not."""

    def __init__(self, limiter: DeploymentHandle | None) -> None:
        self._limiter = limiter
        self._actor: ActorHandle | None = None

    async def budget_used(self, key: ApiKey) -> dict:
        """Each of the key's budgets: its period, size and tokens used or reserved."""
        if self._limiter is None or not key.limits.any:
            return {}
        if self._actor is None:
            self._actor = await self._limiter.actor.remote()
        return await self._actor.budget_used.remote(key.name, key.limits)

    async def admit(self, caller: Caller, reserve_tokens: int, budget_tokens: int) -> Lease | None:
        key = caller.key
        if key is None or not key.limits.any or self._limiter is None:
            return None
        per_minute = key.limits.tokens_per_minute
        if per_minute is not None and reserve_tokens > per_minute:
            raise BadRequest(
                f"max_tokens is {reserve_tokens}, more than API key {key.name!r} may use in a minute "
                f"({per_minute} tokens); lower max_tokens"
            )
        lease_id = uuid.uuid4().hex
        actor = self._actor
        try:
            if actor is None:
                actor = self._actor = await self._limiter.actor.remote()
            decision = await asyncio.wait_for(
                actor.acquire.remote(key.name, key.limits, reserve_tokens, lease_id, budget_tokens), ACQUIRE_TIMEOUT_S
            )
        except BaseException as error:
            if actor is not None:
                # The lease may have been granted before its answer was lost (a timeout, a
                # departed client); releasing an unknown lease does nothing.
                actor.release.remote(lease_id, 0)
            if not isinstance(error, Exception):
                raise
            # Asked again next time: Serve replaces a failed limiter, with a new actor.
            self._actor = None
            logger.exception("rate limiter call failed")
            raise Overloaded("the rate limiter is unavailable; retry shortly") from None
        if decision.refusal is not None:
            raise RateLimited(decision.refusal, decision.retry_after_s, decision.headers)
        return Lease(decision, actor)

    @staticmethod
    def release(lease: Lease, tokens_used: int) -> None:
        """Fire and forget: the client's answer never waits for the bookkeeping. A plain actor
        call, so a departing client's cancellation does not reach it."""
        lease.actor.release.remote(lease.decision.lease_id, tokens_used)
