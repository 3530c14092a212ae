"""What happened to one request, written once when it ends (for streams: when the stream ends)
as one INFO log line and as metrics, then handed to whatever else must know (the rate limiter,
the usage ledger)."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.metrics import IngressMetrics

logger = logging.getLogger("ray.serve")

CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before it was answered (nginx's code)."""


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    metrics: IngressMetrics
    key_name: str | None = None
    model: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    reached_engine: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    finished: bool = False
    duration_s: float = 0.0
    on_finish: list[Callable[["RequestRecord"], None]] = field(default_factory=list)

    def route_to(self, model_id: str) -> None:
        self.model = model_id
        self.metrics.request_started(model_id)

    def token_seen(self) -> None:
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.token_gaps.append(now - self.last_token_at)
        self.last_token_at = now

    def set_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.completion_tokens = usage.get("completion_tokens") or 0

    def answered(self, usage: dict | None, finish_reason: str | None) -> None:
        """A whole (non-streamed) answer: its one output is its first token too."""
        self.token_seen()
        self.set_usage(usage)
        self.finish_reason = finish_reason
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        total_s = self.duration_s = time.perf_counter() - self.started
        ttft_s = None if self.first_token_at is None else self.first_token_at - self.started
        fields = {
            "request_id": self.request_id, "endpoint": self.endpoint, "key": self.key_name, "model": self.model,
            "status": self.status, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 1), "total_ms": round(total_s * 1000, 1),
        }
        # The text line is for people; `llm_request` carries the same fields into JSON logs.
        logger.info(
            "request id=%s endpoint=%s key=%s model=%s status=%d prompt_tokens=%d completion_tokens=%d "
            "finish=%s ttft=%s total=%.1fms",
            self.request_id, self.endpoint, self.key_name or "-", self.model or "-", self.status,
            self.prompt_tokens, self.completion_tokens, self.finish_reason or "-",
            "-" if ttft_s is None else f"{ttft_s * 1000:.1f}ms", total_s * 1000,
            extra={"llm_request": fields},
        )
        self.metrics.request_finished(self, ttft_s, total_s)
        for callback in self.on_finish:
            callback(self)