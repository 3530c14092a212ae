"""The ingress's gate when the rate limiter fails (`auth.limiter`): refused with 503 (`closed`), or
admitted without limits for a bounded time (`open`), until a probe finds the limiter answering
again; on a fake limiter handle whose actor the test kills, hangs or replaces, and a clock the
test moves."""

import asyncio
import logging
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from cluster.schema import ApiKey, KeyLimits, LimiterSettings
from serve_app.errors import Overloaded, RateLimited
from serve_app.tenancy.budgets import Ask, Subject
from serve_app.tenancy.keys import Caller
from serve_app.tenancy.limiter import PROBE_EVERY_S, LimitGate
from serve_app.tenancy.quotas import RateLimits
from tests.captured_logs import serve_records

LIMITED = Caller(ApiKey(name="k", sha256="0" * 64, limits=KeyLimits(requests_per_minute=1)))
CONCURRENT = Caller(ApiKey(name="c", sha256="1" * 64, limits=KeyLimits(concurrent_requests=1)))
FREE = Caller(ApiKey(name="free", sha256="2" * 64))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Method:
    """An actor's or a handle's method as the gate calls it: `.remote()` returns something to
    await, as a Ray object ref or a Serve response is."""

    def __init__(self, answer: Any) -> None:
        self._answer = answer

    def remote(self, *args: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        try:
            result = self._answer(*args)
        except Exception as error:
            future.set_exception(error)
        else:
            if result is not _HANG:
                future.set_result(result)
        return future


_HANG = object()


class FakeActor:
    """The limits actor: real bookkeeping on the test's clock; the test kills or hangs it."""

    def __init__(self, clock: Clock) -> None:
        self.limits = RateLimits(clock=clock)
        self.dead = False
        self.hung = False
        self.acquired: list[str] = []
        self.released: list[str] = []
        self.acquire = _Method(self._acquire)
        self.release = _Method(self._release)
        self.ping = _Method(self._ping)
        self.budget_used = _Method(self._budget_used)

    def _budget_used(self, subject):
        self._check()
        return _HANG if self.hung else self.limits.budgets.used(subject)

    def _acquire(self, subjects, reserve_tokens, lease_id, ask):
        """Hung, it may have decided, but its answer never comes."""
        self._check()
        self.acquired.append(lease_id)
        decision = self.limits.acquire(subjects, reserve_tokens, lease_id, ask)
        return _HANG if self.hung else decision

    def _release(self, lease_id, used):
        """Recorded even when dead: the test asks which actor a release was sent to."""
        self.released.append(lease_id)
        if not self.dead:
            self.limits.release(lease_id, used)

    def _ping(self):
        self._check()

    def _check(self) -> None:
        if self.dead:
            raise ActorDiedError()


class FakeLimiter:
    """The `rate-limiter` deployment's handle: `actor` answers its current replica's actor."""

    def __init__(self, actor: FakeActor) -> None:
        self.current = actor
        self.lookups = 0
        self.actor = _Method(self._actor)

    def _actor(self) -> FakeActor:
        self.lookups += 1
        return self.current


async def _admit(gate: LimitGate, caller: Caller = LIMITED):
    return await gate.admit(caller, 4, Ask(4))


async def _probes_done() -> None:
    """Until the probe the gate started, if any, has ended."""
    await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))


def _gate(clock: Clock, **settings) -> tuple[LimitGate, FakeLimiter, list[str | None]]:
    counted: list[str | None] = []
    limiter = FakeLimiter(FakeActor(clock))
    return LimitGate(limiter, LimiterSettings(**settings), counted.append, clock), limiter, counted


async def test_closed_refuses_limited_requests_with_503_until_a_probe_finds_the_replaced_limiter():
    clock = Clock()
    gate, limiter, counted = _gate(clock, on_failure="closed")
    first = limiter.current
    assert (await _admit(gate)).actor is first
    with pytest.raises(RateLimited):
        await _admit(gate)  # 1 request per minute
    first.dead = True
    with serve_records() as logs:
        refusals = []
        for _ in range(3):
            with pytest.raises(Overloaded) as refused:
                await _admit(gate)
            refusals.append(refused.value)
            await _probes_done()
        assert await _admit(gate, FREE) is None  # a key without limits never asks the limiter
        # The first refusal started one probe (the dead actor's replica still answers, with it);
        # the next two, within PROBE_EVERY_S, asked nothing.
        assert (limiter.lookups, len(first.acquired)) == (2, 2)
        for error in refusals:
            assert (error.status, error.headers) == (503, {"Retry-After": "1"})
            assert error.message == "the rate limiter is unavailable; retry shortly"

        limiter.current = FakeActor(clock)  # Serve replaced the replica
        clock.now += PROBE_EVERY_S
        with pytest.raises(Overloaded):
            await _admit(gate)  # answered at once; its probe finds the new actor
        await _probes_done()
        # The new limiter forgot the minute: admitted, then limited again.
        assert (await _admit(gate)).actor is limiter.current
        with pytest.raises(RateLimited):
            await _admit(gate)
    [warning] = logs.at(logging.WARNING)
    assert warning.getMessage() == (
        "the rate limiter is unavailable (ActorDiedError The actor died unexpectedly before finishing this task.); "
        "refusing requests of limited keys with 503 until it answers (auth.limiter.on_failure: closed)"
    )
    [recovered] = [r.getMessage() for r in logs.records if r.levelno == logging.INFO]
    assert recovered == (
        "the rate limiter answers again after 0.5 s; meanwhile 0 requests of limited keys were admitted "
        "without limits and 4 refused"
    )
    assert counted == []


async def test_open_admits_without_limits_up_to_the_bound_then_refuses_and_resets_when_the_limiter_answers():
    clock = Clock()
    gate, limiter, counted = _gate(clock, on_failure="open", fail_open_max_s=30)
    assert (await _admit(gate)).actor is limiter.current
    limiter.current.dead = True
    with serve_records() as logs:
        start = clock.now
        for offset in (0, 10, 30):  # from the first failure on, through the bound
            clock.now = start + offset
            assert await _admit(gate) is None  # admitted, though the minute's 1 request was used
            await _probes_done()
        assert counted == ["k", "k", "k"]
        clock.now = start + 30.5
        for _ in range(2):
            with pytest.raises(Overloaded) as refused:
                await _admit(gate)
            assert refused.value.headers == {"Retry-After": "1"}
            assert refused.value.message == "the rate limiter has been unavailable for more than 30 s; retry shortly"
        await _probes_done()
        warnings = [r.getMessage() for r in logs.at(logging.WARNING)]
        assert warnings == [
            "the rate limiter is unavailable (ActorDiedError The actor died unexpectedly before finishing this "
            "task.); admitting requests of limited keys without limits for at most 30 s, then refusing them with "
            "503 until it answers (auth.limiter.on_failure: open)",
            "the rate limiter has not answered for 30 s (auth.limiter.fail_open_max_s); refusing requests of "
            "limited keys with 503 until it answers",
        ]

        limiter.current = FakeActor(clock)
        clock.now += PROBE_EVERY_S
        with pytest.raises(Overloaded):
            await _admit(gate)
        await _probes_done()
        assert (await _admit(gate)).actor is limiter.current
        with pytest.raises(RateLimited):
            await _admit(gate)  # limited again

        # A later outage is bounded from its own first failure, and logged anew.
        clock.now += 1000
        limiter.current.dead = True
        assert await _admit(gate) is None
        assert len(logs.at(logging.WARNING)) == 3
    assert counted == ["k"] * 4


async def test_a_limiter_that_does_not_answer_in_time_is_down_and_the_lease_it_may_grant_is_released():
    clock = Clock()
    gate, limiter, _ = _gate(clock, on_failure="closed", timeout_s=0.01)
    limiter.current.hung = True
    with serve_records() as logs, pytest.raises(Overloaded):
        await _admit(gate)
    await _probes_done()
    actor = limiter.current
    assert len(actor.acquired) == 1 and actor.released == actor.acquired
    [warning] = logs.at(logging.WARNING)
    assert warning.getMessage().startswith("the rate limiter is unavailable (no answer within 0.01 s); refusing")


async def test_a_lease_is_released_to_the_limiter_that_granted_it_never_to_its_successor():
    clock = Clock()
    gate, limiter, _ = _gate(clock, on_failure="closed")
    granter = limiter.current
    lease = await _admit(gate)
    granter.dead = True
    with pytest.raises(Overloaded):
        await _admit(gate)
    await _probes_done()
    limiter.current = FakeActor(clock)
    clock.now += PROBE_EVERY_S
    with pytest.raises(Overloaded):
        await _admit(gate)
    await _probes_done()
    LimitGate.release(lease, Ask(3))
    assert granter.released[-1] == lease.decision.lease_id  # after the failed call's own release
    assert limiter.current.released == []


async def test_a_client_that_leaves_while_the_limiter_decides_is_no_outage():
    clock = Clock()
    gate, limiter, _ = _gate(clock, on_failure="closed")
    actor = limiter.current
    actor.hung = True
    waiting = asyncio.create_task(_admit(gate, CONCURRENT))
    while not actor.acquired:  # until the request waits for its decision, which took the one slot
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert len(actor.acquired) == 1 and actor.released == actor.acquired
    actor.hung = False
    # The next request asks the limiter, as before, and gets the slot the lost answer gave back.
    assert (await _admit(gate, CONCURRENT)).actor is actor


async def test_budgets_are_read_within_the_decision_timeout_or_answered_503():
    """An admin's view of a budget must not wait in Serve's queue for a limiter being replaced."""
    clock = Clock()
    gate, limiter, _ = _gate(clock, timeout_s=0.05)
    budgeted = Subject.key("b", KeyLimits(tokens_per_day=100))
    assert (await gate.budget_used(budgeted))["tokens_per_day"]["budget"] == 100
    limiter.current.hung = True
    with pytest.raises(Overloaded, match="budgets cannot be read"):
        await gate.budget_used(budgeted)
    with pytest.raises(Overloaded):  # the outage is known now: no second wait
        await asyncio.wait_for(gate.budget_used(budgeted), 0.01)
    limiter.current.hung = False
    await _probes_done()  # the reads started a probe: the outage ends without any chat request
    assert (await gate.budget_used(budgeted))["tokens_per_day"]["used"] == 0
