"""Per-key token budgets over UTC calendar periods (a day, a month), held exactly: a request is
admitted only if its reservation fits what is left of every period's budget, and its reservation
is settled to its real count when it ends, so that under any concurrency no budget is exceeded.

Pure bookkeeping, like `quotas`, hosted by the same limiter actor; a limiter that restarts is
seeded with each period's spend from the usage ledger.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from cluster.schema import KeyLimits

PERIODS = ("day", "month")


def period_of(kind: str, unix: float) -> tuple[str, float, float]:
    """The period's label, its start and the start of the next one, in unix seconds."""
    day = datetime.fromtimestamp(unix, UTC).date()
    if kind == "day":
        start, end = day, day + timedelta(days=1)
        label = day.isoformat()
    else:
        start = day.replace(day=1)
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        label = start.isoformat()[:7]
    return label, _unix(start), _unix(end)


def _unix(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def budget_of(limits: KeyLimits, kind: str) -> int | None:
    return limits.tokens_per_day if kind == "day" else limits.tokens_per_month


@dataclass
class _Spent:
    label: str
    tokens: float = 0.0


@dataclass(frozen=True)
class Reservation:
    kind: str
    label: str
    tokens: int


class Budgets:
    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._spent: dict[tuple[str, str], _Spent] = {}
        self._clock = wall_clock

    def seed(self, key: str, kind: str, label: str, tokens: float) -> None:
        """Spend already recorded in the ledger for the period, for a limiter that restarted."""
        self._spent[(key, kind)] = _Spent(label, tokens)

    def refusal(self, key: str, limits: KeyLimits, tokens: int) -> tuple[str, float] | None:
        """Why the reservation does not fit, and the seconds until the period that refuses it ends."""
        now = self._clock()
        for kind in PERIODS:
            budget = budget_of(limits, kind)
            if budget is None:
                continue
            spent = self._current(key, kind, now)
            if spent.tokens + tokens > budget:
                label, _, reset = period_of(kind, now)
                message = (
                    f"has used or reserved {spent.tokens:.0f} of its {budget} tokens for {label} (UTC), and this "
                    f"request reserves {tokens} (its max_tokens and the most its prompt can count); the budget "
                    f"resets at {datetime.fromtimestamp(reset, UTC).isoformat()}"
                )
                return message, reset - now
        return None

    def reserve(self, key: str, limits: KeyLimits, tokens: int) -> list[Reservation]:
        now = self._clock()
        reservations = []
        for kind in PERIODS:
            if budget_of(limits, kind) is not None:
                spent = self._current(key, kind, now)
                spent.tokens += tokens
                reservations.append(Reservation(kind, spent.label, tokens))
        return reservations

    def settle(self, key: str, reservations: list[Reservation], tokens_used: int) -> None:
        """A period that ended meanwhile keeps what was reserved in it: its count is gone."""
        for reservation in reservations:
            spent = self._spent.get((key, reservation.kind))
            if spent is not None and spent.label == reservation.label:
                spent.tokens += tokens_used - reservation.tokens

    def used(self, key: str, limits: KeyLimits) -> dict[str, dict]:
        now = self._clock()
        report = {}
        for kind in PERIODS:
            budget = budget_of(limits, kind)
            if budget is not None:
                spent = self._current(key, kind, now)
                report[f"tokens_per_{kind}"] = {"period": spent.label, "budget": budget, "used": round(spent.tokens)}
        return report

    def headers(self, key: str, limits: KeyLimits) -> dict[str, str]:
        now = self._clock()
        headers = {}
        for kind in PERIODS:
            budget = budget_of(limits, kind)
            if budget is not None:
                spent = self._current(key, kind, now)
                headers[f"x-ratelimit-limit-tokens-{kind}"] = str(budget)
                headers[f"x-ratelimit-remaining-tokens-{kind}"] = str(max(0, int(budget - spent.tokens)))
                headers[f"x-ratelimit-reset-tokens-{kind}"] = f"{round(period_of(kind, now)[2] - now)}s"
        return headers

    def _current(self, key: str, kind: str, now: float) -> _Spent:
        label = period_of(kind, now)[0]
        spent = self._spent.get((key, kind))
        if spent is None or spent.label != label:
            spent = self._spent[(key, kind)] = _Spent(label)
        return spent
