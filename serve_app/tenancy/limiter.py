"""Where rate-limit state lives: one actor for the whole application, which every ingress replica
asks before a keyed request does any engine work; it holds every key's and tenant's counts.

One holder, not counters per ingress replica, because a limit must hold for the cluster: with two
ingress replicas, N requests per minute must admit N, not 2N. A Ray actor, not Redis, because Ray
is already there and one in-memory call is cheap (docs/design.md). The actor is owned by the one
replica of the `rate-limiter` Serve deployment, so Serve manages its life (started with the
application, replaced if it fails, gone with it), while ingress replicas call the actor directly:
a plain actor call costs less than a Serve handle call. Keys without limits never make the call,
nor do those of tenants without limits.

While the limiter does not answer, each ingress replica applies the config's policy
(`auth.limiter`): refuse limited requests with 503, or admit them without limits for a bounded
time. It does not ask the limiter on every request meanwhile (a call to a replica being replaced
waits in Serve's queue); one request in each `PROBE_EVERY_S` starts a probe instead. A replaced
limiter has forgotten the minute windows (limits reopen for at most one window) and the requests
in flight, and reads its budgets' use back from the ledger (`_seed`).
"""

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from cluster.schema import LimiterSettings
from serve_app.errors import BadRequest, Overloaded, RateLimited
from serve_app.tenancy.budgets import PERIODS, Ask, Budgets, Subject, period_of
from serve_app.tenancy.keys import Caller
from serve_app.tenancy.quotas import Decision, RateLimits
from serve_app.tenancy.usage_store import UsageStore

logger = logging.getLogger("ray.serve")

PROBE_EVERY_S = 0.5
"""While the limiter is down, how often an ingress replica looks whether it answers again."""

LIMITER_OPTIONS = {
    "name": "rate-limiter",
    "num_replicas": 1,
    # Limited requests are refused, or unlimited, while it is down: Serve replaces a replica after
    # three failed checks, 6 s after its actor died rather than 30 at Serve's default period. The
    # timeout stays Serve's (30 s): a new actor's first ping waits for its seed from the ledger.
    "health_check_period_s": 2,
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
    """A granted lease and the actor that holds it, which is the one to release it: the ingress
    may have moved on to a new actor meanwhile, which never heard of the lease (a call to a dead
    actor fails in Ray, silently)."""

    decision: Decision
    actor: ActorHandle


@dataclass
class _Outage:
    """The limiter's failure as one ingress replica sees it: from the first failed call until a
    probe finds it answering."""

    since: float
    admitted: int = 0
    """Requests admitted without limits."""
    refused: int = 0
    bound_passed: bool = False
    probed_at: float = float("-inf")
    probe: asyncio.Task[None] | None = None


class LimitGate:
    """The ingress's side: admits a request or raises the 429 (or 400) that says why not; while
    the limiter does not answer, admits it without limits or raises the 503 the policy says."""

    def __init__(
        self,
        limiter: DeploymentHandle | None,
        settings: LimiterSettings = LimiterSettings(),
        admitted_unlimited: Callable[[str | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`admitted_unlimited` is told the key of each request admitted without limits."""
        self._limiter = limiter
        self._settings = settings
        self._admitted_unlimited = admitted_unlimited
        self._clock = clock
        self._actor: ActorHandle | None = None
        self._outage: _Outage | None = None

    async def budget_used(self, subject: Subject) -> dict:
        """Each of a key's or tenant's budgets: its period, size and what is used or reserved.
        Bounded as a decision is: an admin asking during an outage learns of it at once."""
        if self._limiter is None or not subject.limits.any:
            return {}
        if self._outage is None:
            try:
                return await asyncio.wait_for(self._budget_used(subject), self._settings.timeout_s)
            except Exception as error:
                self._failed(error)
        self._probe_soon()
        raise Overloaded("the rate limiter is unavailable, so budgets cannot be read; retry shortly", retry_after_s=1)

    async def _budget_used(self, subject: Subject) -> dict:
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
                    f"this request may use {reserve_tokens} tokens (its max_tokens for each choice, or the model's "
                    f"context where it sets none), more than {subject.label} may use in a minute "
                    f"({per_minute} tokens); lower max_tokens"
                )
        if self._outage is None:
            try:
                lease = await asyncio.wait_for(self._acquire(subjects, reserve_tokens, ask), self._settings.timeout_s)
            except Exception as error:
                self._failed(error)
            else:
                decision = lease.decision
                if decision.refusal is not None:
                    raise RateLimited(decision.refusal, decision.retry_after_s, decision.headers)
                return lease
        self._without_limiter(caller)
        return None

    @staticmethod
    def release(lease: Lease, used: Ask) -> None:
        """Fire and forget: the client's answer never waits for the bookkeeping. A plain actor
        call, so a departing client's cancellation does not reach it."""
        lease.actor.release.remote(lease.decision.lease_id, used)

    async def _acquire(self, subjects: list[Subject], reserve_tokens: int, ask: Ask) -> Lease:
        if self._actor is None:
            self._actor = await self._limiter.actor.remote()
        actor, lease_id = self._actor, uuid.uuid4().hex
        try:
            decision = await actor.acquire.remote(subjects, reserve_tokens, lease_id, ask)
        except BaseException:
            # The lease may have been granted before its answer was lost (a timeout, a departed
            # client); releasing an unknown lease does nothing.
            actor.release.remote(lease_id, Ask(0))
            raise
        return Lease(decision, actor)

    def _failed(self, error: Exception) -> None:
        """The first failure starts an outage, logged once; calls that were in flight with it
        may fail after it."""
        self._actor = None
        if self._outage is not None:
            return
        self._outage = _Outage(since=self._clock())
        if isinstance(error, TimeoutError):
            why = f"no answer within {self._settings.timeout_s:g} s"
        else:
            why = " ".join([type(error).__name__, *str(error).splitlines()[:1]])
        if self._settings.on_failure == "open":
            plan = (
                f"admitting requests of limited keys without limits for at most {self._settings.fail_open_max_s:g} s, "
                "then refusing them with 503"
            )
        else:
            plan = "refusing requests of limited keys with 503"
        logger.warning(
            "the rate limiter is unavailable (%s); %s until it answers (auth.limiter.on_failure: %s)",
            why,
            plan,
            self._settings.on_failure,
        )

    def _probe_soon(self) -> None:
        """Starts a probe if none ran in the last `PROBE_EVERY_S`: whatever meets the outage (a
        request, an admin reading budgets) helps end it."""
        outage = self._outage
        now = self._clock()
        if (outage.probe is None or outage.probe.done()) and now - outage.probed_at >= PROBE_EVERY_S:
            outage.probed_at = now
            # Outside the request's context: a handle call made in it is the request's child,
            # cancelled when its client leaves.
            outage.probe = asyncio.create_task(self._probe(outage), context=contextvars.Context())

    def _without_limiter(self, caller: Caller) -> None:
        """Admits the request (returns) or raises the 503, as the policy says for this moment of
        the outage."""
        self._probe_soon()
        outage = self._outage
        now = self._clock()
        if self._settings.on_failure == "closed":
            outage.refused += 1
            raise Overloaded("the rate limiter is unavailable; retry shortly")
        bound_s = self._settings.fail_open_max_s
        if now - outage.since <= bound_s:
            outage.admitted += 1
            if self._admitted_unlimited is not None:
                self._admitted_unlimited(caller.key_name)
            return
        if not outage.bound_passed:
            outage.bound_passed = True
            logger.warning(
                "the rate limiter has not answered for %g s (auth.limiter.fail_open_max_s); refusing requests "
                "of limited keys with 503 until it answers",
                bound_s,
            )
        outage.refused += 1
        raise Overloaded(f"the rate limiter has been unavailable for more than {bound_s:g} s; retry shortly")

    async def _probe(self, outage: _Outage) -> None:
        """Serve replaces a failed limiter, with a new actor: the outage ends when one answers."""
        try:
            actor = await asyncio.wait_for(self._answering(), self._settings.timeout_s)
        except Exception:
            return  # the next request after PROBE_EVERY_S looks again
        self._actor, self._outage = actor, None
        logger.info(
            "the rate limiter answers again after %.1f s; meanwhile %d requests of limited keys were admitted "
            "without limits and %d refused",
            self._clock() - outage.since,
            outage.admitted,
            outage.refused,
        )

    async def _answering(self) -> ActorHandle:
        actor = await self._limiter.actor.remote()
        await actor.ping.remote()
        return actor
