"""Per-key and per-tenant limits over a sliding minute: requests, tokens (reserved up front,
settled to the real count when the request ends) and requests in flight; and their budgets
(`budgets`).

Pure bookkeeping in one process's memory, with no I/O and no awaits, so that one call costs
microseconds; `serve_app.tenancy.limiter` hosts it in the cluster's single limiter replica. Memory is bounded by
the requests of the last minute plus those in flight.
"""

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.schema import KeyLimits
from serve_app.tenancy.budgets import Ask, Budgets, Reservation, Reserved, Subject

WINDOW_S = 60.0
LEASE_TTL_S = 900.0
"""A lease whose release never comes (its ingress replica died) frees its concurrency slot after
this long; no stream is expected to run longer."""


@dataclass
class Decision:
    """The answer to one admission: a lease to release when the request ends, or why not and
    when to retry. `headers` are the OpenAI-style `x-ratelimit-*` headers for the limits;
    `soft_passed` the soft budgets the request was admitted past."""

    lease_id: str | None
    headers: dict[str, str]
    refusal: str | None = None
    retry_after_s: float = 0.0
    soft_passed: list[str] = field(default_factory=list)
    soft_first: list[str] = field(default_factory=list)


class _Window:
    """(time, amount) entries of the last minute and their running sum."""

    def __init__(self) -> None:
        self.entries: deque[list[float]] = deque()
        self.total = 0.0

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            self.total -= self.entries.popleft()[1]

    def add(self, now: float, amount: float) -> list[float]:
        entry = [now, amount]
        self.entries.append(entry)
        self.total += amount
        return entry

    def settle(self, now: float, entry: list[float], amount: float) -> None:
        """Corrects a reservation to the real amount; one that already left the window counts
        what went beyond it from now on (a long stream is not charged only its reservation)."""
        if entry[0] > now - WINDOW_S:
            self.total += amount - entry[1]
            entry[1] = amount
        elif amount > entry[1]:
            self.add(now, amount - entry[1])

    def wait_for_room(self, now: float, needed: float, limit: float) -> float:
        """Seconds until entries leaving the window make room for `needed` more."""
        excess = self.total + needed - limit
        for stamp, amount in self.entries:
            excess -= amount
            if excess <= 0:
                return stamp + WINDOW_S - now
        return WINDOW_S

    def reset_s(self, now: float) -> float:
        """Seconds until the window is empty again, as OpenAI's `x-ratelimit-reset-*` reports."""
        return self.entries[-1][0] + WINDOW_S - now if self.entries else 0.0


@dataclass
class _Lease:
    expires: float
    counted: list[tuple["_State", list[float] | None]]
    """Each subject's state, and its tokens-per-minute entry."""
    budget: list[Reservation]


@dataclass
class _State:
    limits: KeyLimits
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    in_flight: int = 0


class RateLimits:
    """Each request brings its subjects (its key, and its tenant if it has one) with their limits
    as they are now, so that a key or tenant made or changed at runtime is limited at once, and a
    changed limit applies to the minute already counted. A request is admitted only if every
    subject has room, and then counts toward each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, budgets: Budgets | None = None) -> None:
        self._states: dict[str, _State] = {}
        self._leases: dict[str, _Lease] = {}
        self._clock = clock
        self.budgets = budgets or Budgets()

    def acquire(
        self, subjects: Sequence[Subject], reserve_tokens: int, lease_id: str | None = None, ask: Ask | None = None
    ) -> Decision:
        """A caller may name the lease, so that it can release one whose answer it never got.
        `ask` is what the budgets reserve (by default `reserve_tokens` tokens, no spend)."""
        ask = ask or Ask(reserve_tokens)
        now = self._clock()
        self._expire_leases(now)
        subjects = [subject for subject in subjects if subject.limits.any]
        if not subjects:
            return Decision(lease_id=None, headers={})
        states = []
        for subject in subjects:
            state = self._states.get(subject.id)
            if state is None:
                state = self._states[subject.id] = _State(subject.limits)
            state.limits = subject.limits
            state.requests.prune(now)
            state.tokens.prune(now)
            states.append(state)
        for subject, state in zip(subjects, states, strict=True):
            refused = _refusal(state, now, reserve_tokens) or self.budgets.refusal(subject, ask)
            if refused is not None:
                retry = max(1, math.ceil(refused[1]))
                return Decision(
                    lease_id=None,
                    headers=self._headers(subjects, states, now),
                    refusal=f"{subject.label} {refused[0]}; retry in {retry} s",
                    retry_after_s=retry,
                )
        reserved = Reserved()
        counted = []
        for subject, state in zip(subjects, states, strict=True):
            state.requests.add(now, 1)
            state.in_flight += 1
            entry = state.tokens.add(now, reserve_tokens) if subject.limits.tokens_per_minute is not None else None
            counted.append((state, entry))
            self.budgets.reserve(subject, ask, reserved)
        lease_id = lease_id or uuid.uuid4().hex
        self._leases[lease_id] = _Lease(expires=now + LEASE_TTL_S, counted=counted, budget=reserved.reservations)
        return Decision(
            lease_id=lease_id,
            headers=self._headers(subjects, states, now),
            soft_passed=reserved.soft_passed,
            soft_first=reserved.soft_first,
        )

    def release(self, lease_id: str, used: Ask) -> None:
        """Ends a lease: frees its concurrency slots and settles its reservations to the real count."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        now = self._clock()
        for state, entry in lease.counted:
            state.in_flight -= 1
            if entry is not None:
                state.tokens.settle(now, entry, used.tokens)
        self.budgets.settle(lease.budget, used)

    def _expire_leases(self, now: float) -> None:
        """Leases sit in the order they were made, which is the order they expire in."""
        while self._leases:
            lease_id, lease = next(iter(self._leases.items()))
            if lease.expires > now:
                return
            del self._leases[lease_id]
            for state, _ in lease.counted:
                state.in_flight -= 1

    def _headers(self, subjects: list[Subject], states: list[_State], now: float) -> dict[str, str]:
        """The key's own limits, and its tenant's where the key has none of that kind."""
        headers: dict[str, str] = {}
        for subject, state in reversed(list(zip(subjects, states, strict=True))):
            headers |= _headers(state, now) | self.budgets.headers(subject)
        return headers


def _refusal(state: _State, now: float, reserve_tokens: int) -> tuple[str, float] | None:
    limits = state.limits
    if limits.concurrent_requests is not None and state.in_flight >= limits.concurrent_requests:
        return f"has {state.in_flight} requests in flight, its limit of concurrent requests", 1.0
    if limits.requests_per_minute is not None and state.requests.total >= limits.requests_per_minute:
        wait_s = state.requests.wait_for_room(now, 1, limits.requests_per_minute)
        return f"is at its limit of {limits.requests_per_minute} requests per minute", wait_s
    if limits.tokens_per_minute is not None and (
        state.tokens.total >= limits.tokens_per_minute or state.tokens.total + reserve_tokens > limits.tokens_per_minute
    ):
        message = (
            f"is at its limit of {limits.tokens_per_minute} tokens per minute "
            f"({state.tokens.total:.0f} used or reserved; this request reserves {reserve_tokens} for max_tokens)"
        )
        return message, state.tokens.wait_for_room(now, max(reserve_tokens, 1), limits.tokens_per_minute)
    return None


def _headers(state: _State, now: float) -> dict[str, str]:
    headers = {}
    for kind, limit, window in (
        ("requests", state.limits.requests_per_minute, state.requests),
        ("tokens", state.limits.tokens_per_minute, state.tokens),
    ):
        if limit is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(limit - window.total)))
            headers[f"x-ratelimit-reset-{kind}"] = f"{round(window.reset_s(now), 3):g}s"
    return headers
