"""Token budgets over UTC calendar periods, on a wall clock the test moves."""

from datetime import UTC, datetime

from cluster.schema import KeyLimits
from serve_app.tenancy.budgets import Budgets, period_of
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


def test_reservations_that_fit_are_admitted_and_settle_to_the_real_count():
    wall = Wall("2026-12-01T10:00:00")
    limits = RateLimits(budgets=Budgets(wall))
    budget = KeyLimits(tokens_per_day=100)
    leases = [limits.acquire("k", budget, 10, budget_tokens=30) for _ in range(4)]
    assert [lease.refusal is None for lease in leases] == [True, True, True, False]
    refusal = leases[3].refusal
    assert "used or reserved 90 of its 100 tokens for 2026-12-01" in refusal and "2026-12-02T00:00:00" in refusal
    assert leases[3].retry_after_s == 14 * 3600
    assert leases[3].headers["x-ratelimit-remaining-tokens-day"] == "10"
    limits.release(leases[0].lease_id, 5)  # used 5 of the 30 reserved
    assert limits.budgets.used("k", budget)["tokens_per_day"]["used"] == 65
    assert limits.acquire("k", budget, 10, budget_tokens=30).refusal is None


def test_a_new_day_opens_a_new_budget_and_a_late_settlement_does_not_touch_it():
    wall = Wall("2026-12-01T23:59:00")
    limits = RateLimits(budgets=Budgets(wall))
    budget = KeyLimits(tokens_per_day=50, tokens_per_month=80)
    late = limits.acquire("k", budget, 0, budget_tokens=40)
    assert limits.acquire("k", budget, 0, budget_tokens=20).refusal is not None  # the day is full
    wall.now += 120
    limits.release(late.lease_id, 45)  # ended after midnight: the old day kept it
    assert limits.budgets.used("k", budget)["tokens_per_day"] == {"period": "2026-12-02", "budget": 50, "used": 0}
    # The month goes on: 40 reserved, 45 used.
    assert limits.budgets.used("k", budget)["tokens_per_month"]["used"] == 45
    assert "of its 80 tokens for 2026-12" in limits.acquire("k", budget, 0, budget_tokens=40).refusal


def test_a_restarted_limiter_starts_from_the_ledgers_spend():
    wall = Wall("2026-12-01T12:00:00")
    budgets = Budgets(wall)
    budgets.seed("k", "day", "2026-12-01", 95)
    limits = RateLimits(budgets=budgets)
    assert limits.acquire("k", KeyLimits(tokens_per_day=100), 0, budget_tokens=10).refusal is not None


def test_the_limiter_seeds_each_keys_budgets_from_the_ledgers_rows_of_the_period(tmp_path):
    import time
    import uuid

    from serve_app.tenancy.limiter import _seed
    from serve_app.tenancy.usage_store import UsageRow, UsageStore

    url = f"sqlite:///{tmp_path}/usage.sqlite"

    def row(key: str | None, at: float, tokens: int) -> UsageRow:
        return UsageRow(uuid.uuid4().hex, "r", at, key, "m", "/llm", tokens, tokens, "stop", 200, 1.0)

    now = time.time()
    UsageStore(url).add([row("k", now, 10), row("k", now, 5), row("other", now, 1), row(None, now, 7)])
    UsageStore(url).add([row("k", period_of("month", now)[1] - 3600, 100)])  # last month's
    budgets = Budgets()
    _seed(budgets, url)
    used = budgets.used("k", KeyLimits(tokens_per_day=1000, tokens_per_month=1000))
    assert used["tokens_per_day"]["used"] == 30 and used["tokens_per_month"]["used"] == 30
    assert budgets.used("other", KeyLimits(tokens_per_day=10))["tokens_per_day"]["used"] == 2
