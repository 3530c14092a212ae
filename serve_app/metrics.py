"""Request metrics through Ray's metrics system, so that Prometheus sees them aggregated across
replicas and nodes (each Ray node exports them on its metrics export port, prefixed `ray_`).

The ingress records what clients see; the model replicas record the engine's share
(`llm_engine_*`), so that the time spent in our layers is the difference of the two.
"""

from collections import Counter as Tally
from typing import TYPE_CHECKING

from ray.util.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from serve_app.request_log import RequestRecord

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_GAP_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
REQUEST_TAGS = ("model", "key", "endpoint")


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "llm_requests", "Requests answered, by final HTTP status.", tag_keys=(*REQUEST_TAGS, "status")
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of answered requests.", tag_keys=REQUEST_TAGS)
        self.completion_tokens = Counter(
            "llm_completion_tokens", "Tokens generated for answered requests.", tag_keys=REQUEST_TAGS
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "Time from a request's arrival to its first token.",
            boundaries=LATENCY_S, tag_keys=REQUEST_TAGS,
        )
        self.itl = Histogram(
            "llm_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
            boundaries=TOKEN_GAP_S, tag_keys=REQUEST_TAGS,
        )
        self.duration = Histogram(
            "llm_request_duration_seconds", "Time from a request's arrival to its last byte.",
            boundaries=LATENCY_S, tag_keys=REQUEST_TAGS,
        )
        self.in_flight = Gauge("llm_requests_in_flight", "Requests being answered now.", tag_keys=("model",))
        self._in_flight: Tally[str] = Tally()

    def request_started(self, model: str) -> None:
        self._in_flight[model] += 1
        self.in_flight.set(self._in_flight[model], {"model": model})

    def request_finished(self, record: "RequestRecord", ttft_s: float | None, total_s: float) -> None:
        tags = {"model": record.model or "-", "key": record.key_name or "-", "endpoint": record.endpoint}
        self.requests.inc(1, tags | {"status": str(record.status)})
        self.duration.observe(total_s, tags)
        if record.model is None:
            return
        self._in_flight[record.model] -= 1
        self.in_flight.set(self._in_flight[record.model], {"model": record.model})
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags)
        for gap in record.token_gaps:
            self.itl.observe(gap, tags)
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens, tags)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens, tags)


class EngineMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(
            "llm_engine_time_to_first_token_seconds", "Time from the replica receiving a request to the engine's first output.",
            boundaries=LATENCY_S, tag_keys=("model",),
        )
        self.duration = Histogram(
            "llm_engine_request_duration_seconds", "Time the replica spent on a request, engine included.",
            boundaries=LATENCY_S, tag_keys=("model",),
        )
