"""One INFO line per request, written when the request ends (for streams: when the stream ends)."""

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("ray.serve")


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str
    key_name: str | None = None
    model: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def token_seen(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def set_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.completion_tokens = usage.get("completion_tokens") or 0

    def log(self) -> None:
        ttft = "-" if self.first_token_at is None else f"{(self.first_token_at - self.started) * 1000:.1f}ms"
        logger.info(
            "request id=%s endpoint=%s key=%s model=%s status=%d prompt_tokens=%d "
            "completion_tokens=%d finish=%s ttft=%s total=%.1fms",
            self.request_id,
            self.endpoint,
            self.key_name or "-",
            self.model or "-",
            self.status,
            self.prompt_tokens,
            self.completion_tokens,
            self.finish_reason or "-",
            ttft,
            (time.perf_counter() - self.started) * 1000,
        )
