"""Where rate-limit state lives: one actor for the whole application, which every ingress replica
asks before a keyed request does any engine work; it holds every key's and tenant's counts.

One holder, not counters per ingress replica, because a limit must hold for the cluster: with two
ingress replicas, N requests per minute must admit N, not 2N. A Ray actor, not Redis, because Ray
is already there and one in-memory call is cheap (docs/design.md). The actor is owned by the one
replica of the `rate-limiter` Serve deployment, so Serve manages its life (started with the
application, replaced if it fails, gone with it), while ingress replicas call the actor directly:
a plain actor call costs less than a Serve handle call. A restarted
limiter forgets the last minute (limits reopen for at most one window). Keys without limits never
make the call, nor do those of tenants without limits.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from serve_app.errors import BadRequest, Overloaded, RateLimited
from serve_app.tenancy.budgets import PERIODS, Ask, Budgets, Subject, period_of
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

    def __init__(self, database: str | None, currency: str | None) -> None:
        self._limits = RateLimits(budgets=Budgets(currency=currency))
        if database is not None:
            _seed(self._limits.budgets, database)

    async def acquire(self, subjects: list[Subject], reserve_tokens: int, lease_id: str, ask: Ask) -> Decision:
        decision = self._limits.acquire(subjects, reserve_tokens, lease_id, ask)
        for passed in decision.soft_first:
            label, _, budget = passed.partition(" soft ")
            logger.warning("%s passed its soft budget %s; requests go on being admitted", label, budget)
        return decision

    async def budget_used(self, subject: Subject) -> dict:
        return self._limits.budgets.used(subject)

    async def release(self, lease_id: str, used: Ask) -> None:
        self._limits.release(lease_id, used)

    async def ping(self) -> None:
        return None


def _seed(budgets: Budgets, database: str) -> None:
    """A limiter that starts (or restarts) counts each budget's period from what the ledger holds,
    for every key and tenant. Rows an ingress replica still holds (at most a flush interval's) are
    not yet there."""
    store = UsageStore(database)
    now = time.time()
    for kind in PERIODS:
        label, start, _ = period_of(kind, now)
        for group in ("key", "tenant"):
            for row in store.totals(since=start, until=None, group_by=(group,)):
                if row[group] is not None:
                    subject = f"{group}:{row[group]}"
                    budgets.seed(subject, "tokens", kind, label, row["total_tokens"])
                    budgets.seed(subject, "spend", kind, label, row["cost"] or 0.0)


class RateLimiter:
    """The Serve deployment that owns the limits actor: its health is the actor's."""

    def __init__(self, database: str | None = None, currency: str | None = None) -> None:
        self._actor = _Limits.remote(database, currency)

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

    async def budget_used(self, subject: Subject) -> dict:
        """Each of a key's or tenant's budgets: its period, size and what is used or reserved."""
        if self._limiter is None or not subject.limits.any:
            return {}
        if self._actor is None:
            self._actor = await self._limiter.actor.remote()
        return await self._actor.budget_used.remote(subject)

    async def admit(self, caller: Caller, reserve_tokens: int, ask: Ask) -> Lease | None:
        subjects = [subject for subject in caller.subjects() if subject.limits.any]
        if not subjects or self._limiter is None:
            return None
        for subject in subjects:
            per_minute = subject.limits.tokens_per_minute
            if per_minute is not None and reserve_tokens > per_minute:
                raise BadRequest(
                    f"max_tokens is {reserve_tokens}, more than {subject.label} may use in a minute "
                    f"({per_minute} tokens); lower max_tokens"
                )
        lease_id = uuid.uuid4().hex
        actor = self._actor
        try:
            if actor is None:
                actor = self._actor = await self._limiter.actor.remote()
            decision = await asyncio.wait_for(
                actor.acquire.remote(subjects, reserve_tokens, lease_id, ask), ACQUIRE_TIMEOUT_S
            )
        except BaseException as error:
            if actor is not None:
                # The lease may have been granted before its answer was lost (a timeout, a
                # departed client); releasing an unknown lease does nothing.
                actor.release.remote(lease_id, Ask(0))
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
    def release(lease: Lease, used: Ask) -> None:
        """Fire and forget: the client's answer never waits for the bookkeeping. A plain actor
        call, so a departing client's cancellation does not reach it."""
        lease.actor.release.remote(lease.decision.lease_id, used)
