"""What a request's answer has told so far, and the frozen record of a request once it has ended,
which every listener reads (the request log, the metrics, the rate limiter's release, the usage
ledger). Plain data: the ledger's replica imports it without the engine."""

import time
from dataclasses import dataclass

CLIENT_CLOSED_REQUEST = 499
"""The status recorded for a request whose client left before it was answered (nginx's code)."""


@dataclass
class Answer:
    """Filled by whoever writes the answer (one body, or a stream chunk by chunk); read once, by
    the request's lifecycle, when the request ends. A stream reports how it ended here instead of
    deciding the request's status itself."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    failed_with: int | None = None
    """The status of a failure told inside a stream whose 200 had already gone out."""
    complete: bool = False
    """The stream's last chunk went out: a stream that ends otherwise lost its client."""
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_chunks: int = 0
    max_token_gap_s: float = 0.0

    def token(self) -> None:
        """A chunk carrying new output (text, reasoning or tool calls; or a whole answer) arrived
        from the model, to be sent on."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        else:
            self.max_token_gap_s = max(self.max_token_gap_s, now - self.last_token_at)
        self.last_token_at = now
        self.token_chunks += 1

    def usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens") or 0
            self.completion_tokens = usage.get("completion_tokens") or 0

    def fail(self, status: int) -> None:
        self.failed_with = status
        self.finish_reason = "error"

    def stream_status(self) -> int:
        if self.failed_with is not None:
            return self.failed_with
        return 200 if self.complete else CLIENT_CLOSED_REQUEST

    def mean_token_gap_s(self) -> float | None:
        if self.token_chunks < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.token_chunks - 1)


@dataclass(frozen=True)
class FinishedRequest:
    request_id: str
    endpoint: str
    key_name: str | None
    model: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    started_at: float
    """Unix time of its arrival."""
    duration_s: float
    ttft_s: float | None
    mean_token_gap_s: float | None
    reached_engine: bool
    """Sent to a model (and perhaps begun there): the usage ledger records such requests only."""
    max_token_gap_s: float | None = None
    """The longest wait between two chunks of a stream: a stall shows here, not in the mean."""
    tenant: str | None = None
    cost: float | None = None
    """Its tokens at its model's prices; None where the model has no price."""
    soft_budgets: tuple[str, ...] = ()
    """The soft budgets it was admitted past, as `<key|tenant>:<name> soft <budget>`."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
