"""Budgets of tokens and spend over UTC calendar periods, per key and per tenant, hard and soft, on
a wall clock the test moves."""

from datetime import UTC, datetime

from cluster.schema import KeyLimits, SoftBudgets
from serve_app.tenancy.budgets import Ask, Budgets, Subject, period_of
from serve_app.tenancy.quotas import RateLimits


class Wall:
    def __init__(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def test_periods_are_utc_calendar_days_and_months():
    at = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    assert period_of("day", at) == (
        "2026-12-31",
        datetime(2026, 12, 31, tzinfo=UTC).timestamp(),
        datetime(2027, 1, 1, tzinfo=UTC).timestamp(),
    )
    assert period_of("month", at)[0] == "2026-12" and period_of("month", at)[2] == period_of("day", at)[2]
    assert (
        period_of("month", datetime(2026, 2, 10, tzinfo=UTC).timestamp())[2]
        == datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    )


def _key(limits: KeyLimits, name: str = "k") -> list[Subject]:
    return [Subject.key(name, limits)]


def test_reservations_that_fit_are_admitted_and_settle_to_the_real_count():
    wall = Wall("2026-12-01T10:00:00")
    limits = RateLimits(budgets=Budgets(wall))
    budget = _key(KeyLimits(tokens_per_day=100))
    leases = [limits.acquire(budget, 10, ask=Ask(30)) for _ in range(4)]
    assert [lease.refusal is None for lease in leases] == [True, True, True, False]
    refusal = leases[3].refusal
    assert refusal.startswith("API key 'k' has used or reserved 90 tokens of its 100 tokens for 2026-12-01")
    assert "2026-12-02T00:00:00" in refusal
    assert leases[3].retry_after_s == 14 * 3600
    assert leases[3].headers["x-ratelimit-remaining-tokens-day"] == "10"
    limits.release(leases[0].lease_id, Ask(5))  # used 5 of the 30 reserved
    assert limits.budgets.used(budget[0])["tokens_per_day"]["used"] == 65
    assert limits.acquire(budget, 10, ask=Ask(30)).refusal is None


def test_a_new_day_opens_a_new_budget_and_a_late_settlement_does_not_touch_it():
    wall = Wall("2026-12-01T23:59:00")
    limits = RateLimits(budgets=Budgets(wall))
    budget = _key(KeyLimits(tokens_per_day=50, tokens_per_month=80))
    late = limits.acquire(budget, 0, ask=Ask(40))
    assert limits.acquire(budget, 0, ask=Ask(20)).refusal is not None  # the day is full
    wall.now += 120
    limits.release(late.lease_id, Ask(45))  # ended after midnight: the old day kept it
    assert limits.budgets.used(budget[0])["tokens_per_day"] == {"period": "2026-12-02", "budget": 50, "used": 0}
    # The month goes on: 40 reserved, 45 used.
    assert limits.budgets.used(budget[0])["tokens_per_month"]["used"] == 45
    assert "of its 80 tokens for 2026-12" in limits.acquire(budget, 0, ask=Ask(40)).refusal


def test_a_tenants_budget_is_shared_by_its_keys_and_a_request_must_fit_its_keys_too():
    limits = RateLimits(budgets=Budgets(Wall("2026-12-01T10:00:00")))
    acme = Subject.tenant("acme", KeyLimits(tokens_per_day=100))
    alice = [Subject.key("alice", KeyLimits()), acme]
    bob = [Subject.key("bob", KeyLimits(tokens_per_day=40)), acme]
    assert limits.acquire(alice, 0, ask=Ask(30)).refusal is None
    assert limits.acquire(bob, 0, ask=Ask(30)).refusal is None
    assert "API key 'bob' has used or reserved 30 tokens of its 40" in limits.acquire(bob, 0, ask=Ask(30)).refusal
    held = limits.acquire(alice, 0, ask=Ask(30))
    assert held.refusal is None
    refused = limits.acquire(alice, 0, ask=Ask(30))
    assert refused.refusal.startswith("tenant 'acme' has used or reserved 90 tokens of its 100 tokens")
    # A refusal counts nowhere: bob's own budget still has its 10 left.
    assert limits.budgets.used(bob[0])["tokens_per_day"]["used"] == 30
    limits.release(held.lease_id, Ask(0))
    assert limits.budgets.used(acme)["tokens_per_day"]["used"] == 60
    assert limits.acquire(alice, 0, ask=Ask(30)).refusal is None


def test_a_tenants_concurrency_and_rate_are_shared_by_its_keys():
    limits = RateLimits(clock=lambda: 1000.0)
    acme = Subject.tenant("acme", KeyLimits(concurrent_requests=2, requests_per_minute=3))
    first = limits.acquire([Subject.key("a", KeyLimits()), acme], 0)
    limits.acquire([Subject.key("b", KeyLimits()), acme], 0)
    refused = limits.acquire([Subject.key("c", KeyLimits()), acme], 0)
    assert refused.refusal.startswith("tenant 'acme' has 2 requests in flight")
    limits.release(first.lease_id, Ask(0))
    third = limits.acquire([Subject.key("c", KeyLimits()), acme], 0)
    assert third.refusal is None
    limits.release(third.lease_id, Ask(0))
    assert "3 requests per minute" in limits.acquire([Subject.key("a", KeyLimits()), acme], 0).refusal


def test_spend_budgets_reserve_the_priced_ask_and_settle_to_the_real_cost():
    limits = RateLimits(budgets=Budgets(Wall("2026-12-01T10:00:00"), currency="USD"))
    budget = _key(KeyLimits(spend_per_day=1.0))
    leases = [limits.acquire(budget, 0, ask=Ask(10, 0.3)) for _ in range(4)]
    assert [lease.refusal is None for lease in leases] == [True, True, True, False]
    assert "used or reserved 0.9 USD of its 1 USD for 2026-12-01" in leases[3].refusal
    assert leases[3].headers["x-ratelimit-remaining-spend-day"] == "0.1"
    limits.release(leases[0].lease_id, Ask(4, 0.05))
    assert limits.budgets.used(budget[0])["spend_per_day"] == {"period": "2026-12-01", "budget": 1.0, "used": 0.65}
    assert limits.acquire(budget, 0, ask=Ask(10, 0.3)).refusal is None


def test_a_soft_budget_never_refuses_and_reports_each_request_past_it_and_the_first():
    wall = Wall("2026-12-01T10:00:00")
    limits = RateLimits(budgets=Budgets(wall))
    soft = _key(KeyLimits(soft=SoftBudgets(tokens_per_day=50)))
    decisions = [limits.acquire(soft, 0, ask=Ask(30)) for _ in range(3)]
    assert [decision.refusal for decision in decisions] == [None, None, None]
    passed = ["key:k soft tokens_per_day"]
    assert [decision.soft_passed for decision in decisions] == [[], passed, passed]
    assert [decision.soft_first for decision in decisions] == [[], passed, []]
    assert limits.budgets.used(soft[0])["soft_tokens_per_day"]["used"] == 90
    wall.now += 86400  # a new day: under it again, and its first pass reported again
    assert limits.acquire(soft, 0, ask=Ask(30)).soft_passed == []
    assert limits.acquire(soft, 0, ask=Ask(30)).soft_first == passed


def test_a_restarted_limiter_starts_from_the_ledgers_spend():
    wall = Wall("2026-12-01T12:00:00")
    budgets = Budgets(wall)
    budgets.seed("key:k", "tokens", "day", "2026-12-01", 95)
    limits = RateLimits(budgets=budgets)
    assert limits.acquire(_key(KeyLimits(tokens_per_day=100)), 0, ask=Ask(10)).refusal is not None


def test_the_limiter_seeds_each_keys_and_tenants_budgets_from_the_ledgers_rows_of_the_period(tmp_path):
    import time
    import uuid

    from serve_app.tenancy.limiter import _seed
    from serve_app.tenancy.usage_store import UsageRow, UsageStore

    url = f"sqlite:///{tmp_path}/usage.sqlite"

    def row(key: str | None, at: float, tokens: int, tenant: str | None = None, cost: float | None = None):
        return UsageRow(uuid.uuid4().hex, "r", at, key, "m", "/llm", tokens, tokens, "stop", 200, 1.0, tenant, cost)

    now = time.time()
    UsageStore(url).add([row("k", now, 10, "acme", 0.5), row("k", now, 5), row("other", now, 1, "acme", 0.25)])
    UsageStore(url).add([row(None, now, 7), row("k", period_of("month", now)[1] - 3600, 100, "acme", 9.0)])
    budgets = Budgets()
    _seed(budgets, url)
    limits = KeyLimits(tokens_per_day=1000, tokens_per_month=1000, spend_per_month=100)
    used = budgets.used(Subject.key("k", limits))
    assert used["tokens_per_day"]["used"] == 30 and used["tokens_per_month"]["used"] == 30
    assert used["spend_per_month"]["used"] == 0.5
    assert budgets.used(Subject.key("other", KeyLimits(tokens_per_day=10)))["tokens_per_day"]["used"] == 2
    acme = budgets.used(Subject.tenant("acme", limits))
    assert acme["tokens_per_month"]["used"] == 22 and acme["spend_per_month"]["used"] == 0.75
