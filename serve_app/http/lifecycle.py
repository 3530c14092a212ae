"""The one owner of a request's record: opened when the request arrives, finished once, here and
nowhere else, however the request ends (an answer, an error, a departed client, a cancellation
anywhere, a stream that fails midway). Whatever must know how a request went (the request log,
the metrics, the key's lease, the usage ledger) listens to the finished, frozen record."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.schema import Price
from serve_app.telemetry.record import Answer, FinishedRequest

logger = logging.getLogger("ray.serve")

Listener = Callable[[FinishedRequest], None]


@dataclass(frozen=True)
class Listeners:
    """The ingress's listeners, the same for every request."""

    routed: tuple[Callable[[str], None], ...] = ()
    finished: tuple[Listener, ...] = ()


class RequestLifecycle:
    def __init__(self, request_id: str, endpoint: str, listeners: Listeners) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.key_name: str | None = None
        self.tenant: str | None = None
        self.model: str | None = None
        self.price: Price | None = None
        self.soft_budgets: tuple[str, ...] = ()
        self.reached_engine = False
        self.answer = Answer()
        self.finished: FinishedRequest | None = None
        self._listeners = listeners
        self._own_listeners: list[Listener] = []
        self._started = time.perf_counter()
        self._started_at = time.time()

    def routed(self, model_id: str, price: Price | None = None) -> None:
        self.model = model_id
        self.price = price
        for listener in self._listeners.routed:
            listener(model_id)

    def on_finish(self, listener: Listener) -> None:
        """A listener of this request alone, such as the release of its key's lease."""
        self._own_listeners.append(listener)

    def finish(self, status: int) -> FinishedRequest:
        """The first call decides; later ones change nothing. A failing listener is logged and the
        others still hear of the request: a bug in one must not lose a usage row."""
        if self.finished is not None:
            return self.finished
        answer = self.answer
        self.finished = finished = FinishedRequest(
            request_id=self.request_id,
            endpoint=self.endpoint,
            key_name=self.key_name,
            model=self.model,
            status=status,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            finish_reason=answer.finish_reason,
            started_at=self._started_at,
            duration_s=time.perf_counter() - self._started,
            ttft_s=None if answer.first_token_at is None else answer.first_token_at - self._started,
            mean_token_gap_s=answer.mean_token_gap_s(),
            max_token_gap_s=answer.max_token_gap_s if answer.token_chunks > 1 else None,
            reached_engine=self.reached_engine,
            tenant=self.tenant,
            cost=None if self.price is None else self.price.cost(answer.prompt_tokens, answer.completion_tokens),
            soft_budgets=self.soft_budgets,
        )
        for listener in (*self._listeners.finished, *self._own_listeners):
            try:
                listener(finished)
            except Exception:
                logger.exception("a listener of request %s failed", self.request_id)
        return finished
