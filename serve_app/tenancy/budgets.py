"""Budgets over UTC calendar periods (a day, a month), of tokens or of spend, per key and per
tenant, held exactly: a request is admitted only if its reservation fits what is left of every
budget it counts toward, and its reservation is settled to its real count when it ends, so that
under any concurrency no budget is exceeded. Soft budgets only report: the requests admitted past
one, and the first of each period.

Pure bookkeeping, like `quotas`, hosted by the same limiter actor; a limiter that restarts is
seeded with each period's spend from the usage ledger.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from cluster.schema import KeyLimits

PERIODS = ("day", "month")
MEASURES = ("tokens", "spend")


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


@dataclass(frozen=True)
class Ask:
    """What a request reserves against budgets: tokens (its max_tokens and its prompt's bound) and
    those tokens priced at its model's prices."""

    tokens: float
    spend: float = 0.0

    def of(self, measure: str) -> float:
        return self.tokens if measure == "tokens" else self.spend


@dataclass(frozen=True)
class Subject:
    """A key or a tenant, with its limits as they are now: a request counts toward each of its
    subjects, its key's and its tenant's."""

    id: str
    label: str
    limits: KeyLimits

    @classmethod
    def key(cls, name: str, limits: KeyLimits) -> "Subject":
        return cls(f"key:{name}", f"API key {name!r}", limits)

    @classmethod
    def tenant(cls, name: str, limits: KeyLimits) -> "Subject":
        return cls(f"tenant:{name}", f"tenant {name!r}", limits)


def _budgets(limits: KeyLimits, soft: bool = False) -> Iterator[tuple[str, str, float]]:
    """(measure, period, size) of each budget set."""
    holder = limits.soft if soft else limits
    for measure in MEASURES:
        for kind in PERIODS:
            size = getattr(holder, f"{measure}_per_{kind}")
            if size is not None:
                yield measure, kind, size


@dataclass
class _Spent:
    label: str
    amount: float = 0.0
    soft_reported: bool = False


@dataclass(frozen=True)
class Reservation:
    subject: str
    measure: str
    kind: str
    label: str
    amount: float


@dataclass
class Reserved:
    """A request's reservations, and the soft budgets it was admitted past: `soft_passed` names
    each as `<subject> <budget>`, and `soft_first` those it is the first of its period to pass."""

    reservations: list[Reservation] = field(default_factory=list)
    soft_passed: list[str] = field(default_factory=list)
    soft_first: list[str] = field(default_factory=list)


class Budgets:
    def __init__(self, wall_clock: Callable[[], float] = time.time, currency: str | None = None) -> None:
        self._spent: dict[tuple[str, str, str], _Spent] = {}
        self._clock = wall_clock
        self._currency = currency or ""

    def seed(self, subject: str, measure: str, kind: str, label: str, amount: float) -> None:
        """Spend already recorded in the ledger for the period, for a limiter that restarted."""
        self._spent[(subject, measure, kind)] = _Spent(label, amount)

    def refusal(self, subject: Subject, ask: Ask) -> tuple[str, float] | None:
        """Why the reservation does not fit, and the seconds until the period that refuses it ends."""
        now = self._clock()
        for measure, kind, size in _budgets(subject.limits):
            spent = self._current(subject.id, measure, kind, now)
            wanted = ask.of(measure)
            if spent.amount + wanted > size:
                label, _, reset = period_of(kind, now)
                reserves = (
                    f"{wanted:.0f} (its max_tokens and the most its prompt can count)"
                    if measure == "tokens"
                    else f"{_money(wanted)} (its max_tokens and the most its prompt can count, at its model's prices)"
                )
                message = (
                    f"has used or reserved {self._amount(measure, spent.amount)} of its "
                    f"{self._amount(measure, size)} for {label} (UTC), and this request reserves {reserves}; "
                    f"the budget resets at {datetime.fromtimestamp(reset, UTC).isoformat()}"
                )
                return message, reset - now
        return None

    def reserve(self, subject: Subject, ask: Ask, into: Reserved) -> None:
        """Counts the ask toward every period a budget of the subject watches, hard or soft."""
        now = self._clock()
        for measure, kind in _watched(subject.limits):
            spent = self._current(subject.id, measure, kind, now)
            spent.amount += ask.of(measure)
            into.reservations.append(Reservation(subject.id, measure, kind, spent.label, ask.of(measure)))
        for measure, kind, size in _budgets(subject.limits, soft=True):
            spent = self._current(subject.id, measure, kind, now)
            if spent.amount > size:
                name = f"{subject.id} soft {measure}_per_{kind}"
                into.soft_passed.append(name)
                if not spent.soft_reported:
                    spent.soft_reported = True
                    into.soft_first.append(name)

    def settle(self, reservations: list[Reservation], used: Ask) -> None:
        """A period that ended meanwhile keeps what was reserved in it: its count is gone."""
        for reservation in reservations:
            spent = self._spent.get((reservation.subject, reservation.measure, reservation.kind))
            if spent is not None and spent.label == reservation.label:
                spent.amount += used.of(reservation.measure) - reservation.amount

    def used(self, subject: Subject) -> dict[str, dict]:
        """Each budget's period, size and what is used or reserved in it (soft ones under `soft_`)."""
        now = self._clock()
        report = {}
        for soft in (False, True):
            for measure, kind, size in _budgets(subject.limits, soft):
                spent = self._current(subject.id, measure, kind, now)
                amount = round(spent.amount) if measure == "tokens" else round(spent.amount, 6)
                report[f"{'soft_' if soft else ''}{measure}_per_{kind}"] = {
                    "period": spent.label,
                    "budget": size,
                    "used": amount,
                }
        return report

    def headers(self, subject: Subject) -> dict[str, str]:
        now = self._clock()
        headers = {}
        for measure, kind, size in _budgets(subject.limits):
            spent = self._current(subject.id, measure, kind, now)
            left = max(0, int(size - spent.amount)) if measure == "tokens" else _money(max(0.0, size - spent.amount))
            headers[f"x-ratelimit-limit-{measure}-{kind}"] = str(size) if measure == "tokens" else _money(size)
            headers[f"x-ratelimit-remaining-{measure}-{kind}"] = str(left)
            headers[f"x-ratelimit-reset-{measure}-{kind}"] = f"{round(period_of(kind, now)[2] - now)}s"
        return headers

    def _current(self, subject: str, measure: str, kind: str, now: float) -> _Spent:
        label = period_of(kind, now)[0]
        spent = self._spent.get((subject, measure, kind))
        if spent is None or spent.label != label:
            spent = self._spent[(subject, measure, kind)] = _Spent(label)
        return spent

    def _amount(self, measure: str, amount: float) -> str:
        return f"{amount:.0f} tokens" if measure == "tokens" else f"{_money(amount)} {self._currency}".rstrip()


def _watched(limits: KeyLimits) -> dict[tuple[str, str], None]:
    """The (measure, period) pairs some budget counts, in order, each once."""
    pairs = [(measure, kind) for soft in (False, True) for measure, kind, _ in _budgets(limits, soft)]
    return dict.fromkeys(pairs)


def _money(amount: float) -> str:
    return f"{amount:.6f}".rstrip("0").rstrip(".") or "0"
