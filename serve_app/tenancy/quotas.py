"""Per-key limits over a sliding minute: requests, tokens (reserved up front, settled to the real
count when the request ends) and requests in flight; and the key's token budgets (`budgets`).

Pure bookkeeping in one process's memory, with no I/O and no awaits, so that one call costs
microseconds; `serve_app.tenancy.limiter` hosts it in the cluster's single limiter replica. Memory is bounded by
the requests of the last minute plus those in flight.
"""

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.schema import KeyLimits
from serve_app.tenancy.budgets import Budgets, Reservation

WINDOW_S = 60.0
LEASE_TTL_S = 900.0
"""A lease whose release never comes (its ingress replica died) frees its concurrency slot after
this long; no stream is expected to run longer."""


@dataclass
class Decision:
    """The answer to one admission: a lease to release when the request ends, or why not and
    when to retry. `headers` are the OpenAI-style `x-ratelimit-*` headers for the key's limits."""

    lease_id: str | None
    headers: dict[str, str]
    refusal: str | None = None
    retry_after_s: float = 0.0


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
    key: str
    expires: float
    tokens: list[float] | None
    budget: list[Reservation]


@dataclass
class _KeyState:
    limits: KeyLimits
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    in_flight: int = 0


class RateLimits:
    """Each request brings its key's limits as they are now, so that a key made or changed at
    runtime is limited at once, and a changed limit applies to the minute already counted."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, budgets: Budgets | None = None) -> None:
        self._keys: dict[str, _KeyState] = {}
        self._leases: dict[str, _Lease] = {}
        self._clock = clock
        self.budgets = budgets or Budgets()

    def acquire(
        self,
        key: str,
        limits: KeyLimits,
        reserve_tokens: int,
        lease_id: str | None = None,
        budget_tokens: int | None = None,
    ) -> Decision:
        """Admits the request if every one of the key's limits has room, and then only counts it.
        A caller may name the lease, so that it can release one whose answer it never got.
        `budget_tokens` is what the budgets reserve (the prompt's bound on top; default
        `reserve_tokens`)."""
        budget_tokens = reserve_tokens if budget_tokens is None else budget_tokens
        now = self._clock()
        self._expire_leases(now)
        if not limits.any:
            return Decision(lease_id=None, headers={})
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(limits)
        state.limits = limits
        state.requests.prune(now)
        state.tokens.prune(now)
        refusal, wait_s = None, 0.0
        if limits.concurrent_requests is not None and state.in_flight >= limits.concurrent_requests:
            refusal = f"has {state.in_flight} requests in flight, its limit of concurrent requests"
            wait_s = 1.0
        elif limits.requests_per_minute is not None and state.requests.total >= limits.requests_per_minute:
            refusal = f"is at its limit of {limits.requests_per_minute} requests per minute"
            wait_s = state.requests.wait_for_room(now, 1, limits.requests_per_minute)
        elif limits.tokens_per_minute is not None and (
            state.tokens.total >= limits.tokens_per_minute
            or state.tokens.total + reserve_tokens > limits.tokens_per_minute
        ):
            refusal = (
                f"is at its limit of {limits.tokens_per_minute} tokens per minute "
                f"({state.tokens.total:.0f} used or reserved; this request reserves {reserve_tokens} for max_tokens)"
            )
            wait_s = state.tokens.wait_for_room(now, max(reserve_tokens, 1), limits.tokens_per_minute)
        elif over_budget := self.budgets.refusal(key, limits, budget_tokens):
            refusal, wait_s = over_budget
        if refusal is not None:
            retry = max(1, math.ceil(wait_s))
            message = f"API key {key!r} {refusal}; retry in {retry} s"
            return Decision(lease_id=None, headers=self._headers(key, state, now), refusal=message, retry_after_s=retry)
        state.requests.add(now, 1)
        reserved = state.tokens.add(now, reserve_tokens) if limits.tokens_per_minute is not None else None
        budget = self.budgets.reserve(key, limits, budget_tokens)
        state.in_flight += 1
        lease_id = lease_id or uuid.uuid4().hex
        self._leases[lease_id] = _Lease(key=key, expires=now + LEASE_TTL_S, tokens=reserved, budget=budget)
        return Decision(lease_id=lease_id, headers=self._headers(key, state, now))

    def release(self, lease_id: str, tokens_used: int) -> None:
        """Ends a lease: frees its concurrency slot and settles its reservation to the real count."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        state = self._keys[lease.key]
        state.in_flight -= 1
        if lease.tokens is not None:
            state.tokens.settle(self._clock(), lease.tokens, tokens_used)
        self.budgets.settle(lease.key, lease.budget, tokens_used)

    def _expire_leases(self, now: float) -> None:
        """Leases sit in the order they were made, which is the order they expire in."""
        while self._leases:
            lease_id, lease = next(iter(self._leases.items()))
            if lease.expires > now:
                return
            del self._leases[lease_id]
            self._keys[lease.key].in_flight -= 1

    def _headers(self, key: str, state: _KeyState, now: float) -> dict[str, str]:
        return _headers(state, now) | self.budgets.headers(key, state.limits)


def _headers(state: _KeyState, now: float) -> dict[str, str]:
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
