"""A colocated model's bounds on its requests, kept by the replica that holds its engine."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ray.serve.exceptions import BackPressureError

from cluster.schema import ModelConfig

CONTROL_PLACES = 32
"""Places in a colocated replica for requests that never reach the engine: `/health`, `/version`,
`/v1/models`, refusals."""

UNBOUNDED_WAITING = 1000
"""The bound on requests waiting for the engine in a colocated replica when the model's queue has
none (`max_queued_requests: -1`): past it they are refused, and the control places stay free."""


class Slots:
    """At most `running` requests in the engine, at most `waiting` waiting for one of those
    places, the rest refused at once. Serve's own bounds would count `/health` and every other
    route's requests in the same places (an orchestrator's health poll would wait behind chat
    requests), and Serve's proxy refuses in plain text, not in the endpoint's error shape."""

    def __init__(self, running: int, waiting: int) -> None:
        self._free = asyncio.Semaphore(running)
        self._max_waiting = waiting
        self._waiting = 0

    @asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        """Refused as Serve refuses past a deployment's queue bound, so that the ingress answers
        both layouts alike."""
        if self._free.locked() and 0 <= self._max_waiting <= self._waiting:
            raise BackPressureError(num_queued_requests=self._waiting, max_queued_requests=self._max_waiting)
        self._waiting += 1
        try:
            await self._free.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._free.release()


def colocated_bounds(model: ModelConfig) -> tuple[int, int] | None:
    """The requests (running, waiting) a colocated replica keeps itself, when it is the model's
    only replica; with more, Serve's proxy keeps one queue for all of them (a replica's own queue
    would hold its requests while another replica, a new one say, sits idle, and Serve's router
    prefers the replicas on its own node until they refuse)."""
    settings = model.deployment
    replicas = settings.autoscaling.max_replicas if settings.autoscaling is not None else settings.num_replicas or 1
    if replicas != 1:
        return None
    waiting = settings.max_queued_requests if settings.max_queued_requests >= 0 else UNBOUNDED_WAITING
    return settings.max_ongoing_requests, waiting


def colocated_slots(model: ModelConfig) -> Slots | None:
    bounds = colocated_bounds(model)
    return None if bounds is None else Slots(*bounds)
