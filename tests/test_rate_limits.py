"""The limit bookkeeping on its own, on a clock the test moves."""

import pytest

from cluster.schema import KeyLimits
from serve_app.tenancy.budgets import Ask, Subject
from serve_app.tenancy.quotas import LEASE_TTL_S, RateLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Keys:
    """The bookkeeping as the limiter's gate calls it: each request with its key's limits."""

    def __init__(self, clock: Clock, limits: dict[str, KeyLimits]) -> None:
        self.limits = limits
        self.quotas = RateLimits(clock=clock)

    def acquire(self, key: str, reserve_tokens: int, lease_id: str | None = None):
        return self.quotas.acquire([Subject.key(key, self.limits.get(key, KeyLimits()))], reserve_tokens, lease_id)

    def release(self, lease_id: str, tokens_used: int) -> None:
        self.quotas.release(lease_id, Ask(tokens_used))


def _limits(clock: Clock, **limits) -> _Keys:
    return _Keys(clock, {"k": KeyLimits(**limits), "free": KeyLimits()})


def test_requests_per_minute_is_a_sliding_minute():
    clock = Clock()
    limits = _limits(clock, requests_per_minute=3)
    for seconds in (0, 10, 20):
        clock.now = 1000 + seconds
        decision = limits.acquire("k", 0)
        assert decision.refusal is None
        limits.release(decision.lease_id, 0)
    clock.now = 1030
    refused = limits.acquire("k", 0)
    assert "3 requests per minute" in refused.refusal and refused.lease_id is None
    assert refused.retry_after_s == 30  # the first request leaves the window at 1060
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "50s"
    clock.now = 1060
    assert limits.acquire("k", 0).refusal is None


def test_tokens_are_reserved_then_settled():
    clock = Clock()
    limits = _limits(clock, tokens_per_minute=100)
    first = limits.acquire("k", 60)
    assert first.headers["x-ratelimit-remaining-tokens"] == "40"
    assert "this request reserves 60" in limits.acquire("k", 60).refusal
    limits.release(first.lease_id, 25)
    second = limits.acquire("k", 60)
    assert second.refusal is None and second.headers["x-ratelimit-remaining-tokens"] == "15"


def test_a_settlement_after_the_window_counts_what_went_beyond_the_reservation():
    clock = Clock()
    limits = _limits(clock, tokens_per_minute=100)
    long_request = limits.acquire("k", 90)
    clock.now += 61
    limits.release(long_request.lease_id, 130)  # 40 beyond its reservation count from now
    assert limits.acquire("k", 50).refusal is None
    assert "90 used or reserved" in limits.acquire("k", 20).refusal


def test_concurrency_counts_leases_until_released_or_expired():
    clock = Clock()
    limits = _limits(clock, concurrent_requests=2)
    held = [limits.acquire("k", 0) for _ in range(2)]
    refused = limits.acquire("k", 0)
    assert "2 requests in flight" in refused.refusal and refused.retry_after_s == 1
    limits.release(held[0].lease_id, 0)
    assert limits.acquire("k", 0).refusal is None
    clock.now += LEASE_TTL_S  # leases whose ingress died free their slots
    assert limits.acquire("k", 0).refusal is None


def test_a_lease_named_by_the_caller_can_be_released_without_its_answer():
    limits = _limits(Clock(), concurrent_requests=1)
    assert limits.acquire("k", 0, lease_id="lost-answer").refusal is None
    limits.release("lost-answer", 0)
    assert limits.acquire("k", 0).refusal is None


def test_release_is_idempotent():
    clock = Clock()
    limits = _limits(clock, concurrent_requests=1)
    lease = limits.acquire("k", 0).lease_id
    limits.release(lease, 0)
    limits.release(lease, 0)
    assert limits.acquire("k", 0).refusal is None
    assert limits.acquire("k", 0).refusal is not None


@pytest.mark.parametrize("key", ["free", "unknown"])
def test_keys_without_limits_are_not_tracked(key):
    decision = _limits(Clock(), requests_per_minute=1).acquire(key, 10**9)
    assert decision.refusal is None and decision.lease_id is None and decision.headers == {}


def test_a_changed_limit_applies_at_once_to_the_minute_already_counted():
    clock = Clock()
    keys = _limits(clock, requests_per_minute=5)
    for _ in range(3):
        assert keys.acquire("k", 0).refusal is None
    keys.limits["k"] = KeyLimits(requests_per_minute=3)
    assert "limit of 3 requests per minute" in keys.acquire("k", 0).refusal
    keys.limits["new"] = KeyLimits(concurrent_requests=1)  # a key made at runtime
    assert keys.acquire("new", 0).refusal is None
    assert keys.acquire("new", 0).refusal is not None
