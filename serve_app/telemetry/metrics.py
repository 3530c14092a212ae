"""Request metrics through Ray's metrics system, so that Prometheus sees them aggregated across
replicas and nodes (each Ray node exports them on its metrics export port, prefixed `ray_`).

The ingress records what clients see; the model replicas record the engine's share
(`llm_engine_*`), so that the time spent in our layers is the difference of the two.
"""

from collections import Counter as Tally

from ray.util.metrics import Counter, Gauge, Histogram

from serve_app.telemetry.record import FinishedRequest

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_GAP_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
REQUEST_TAGS = ("model", "key", "endpoint")


class IngressMetrics:
    """A listener of the ingress's requests: told when one is routed to a model (in flight) and
    when it has ended, from its frozen record."""

    def __init__(self) -> None:
        self.requests = Counter(
            "llm_requests", "Requests answered, by final HTTP status.", tag_keys=(*REQUEST_TAGS, "status")
        )
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of answered requests.", tag_keys=REQUEST_TAGS)
        self.completion_tokens = Counter(
            "llm_completion_tokens", "Tokens generated for answered requests.", tag_keys=REQUEST_TAGS
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            boundaries=LATENCY_S,
            tag_keys=REQUEST_TAGS,
        )
        self.mean_gap = Histogram(
            "llm_mean_token_gap_seconds",
            "Mean time between a stream's consecutive chunks of output, one observation per stream.",
            boundaries=TOKEN_GAP_S,
            tag_keys=REQUEST_TAGS,
        )
        self.max_gap = Histogram(
            "llm_max_token_gap_seconds",
            "Longest time between a stream's consecutive chunks of output (its stalls), one observation per stream.",
            boundaries=TOKEN_GAP_S,
            tag_keys=REQUEST_TAGS,
        )
        self.duration = Histogram(
            "llm_request_duration_seconds",
            "Time from a request's arrival to its last byte.",
            boundaries=LATENCY_S,
            tag_keys=REQUEST_TAGS,
        )
        self.in_flight = Gauge("llm_requests_in_flight", "Requests being answered now.", tag_keys=("model",))
        self.soft_budget_passed = Counter(
            "llm_soft_budget_exceeded_requests",
            "Requests admitted past a soft budget of their key or tenant (which never refuses).",
            tag_keys=("subject", "budget"),
        )
        self.unlimited = Counter(
            "llm_requests_admitted_unlimited",
            "Requests of limited keys admitted without their limits while the rate limiter did not answer "
            "(auth.limiter.on_failure: open).",
            tag_keys=("key",),
        )
        self._in_flight: Tally[str] = Tally()

    def request_routed(self, model: str) -> None:
        self._in_flight[model] += 1
        self.in_flight.set(self._in_flight[model], {"model": model})

    def admitted_unlimited(self, key: str | None) -> None:
        self.unlimited.inc(1, {"key": key or "-"})

    def request_finished(self, request: FinishedRequest) -> None:
        """One observation per request, never per token: this runs on the loop that relays tokens."""
        tags = {"model": request.model or "-", "key": request.key_name or "-", "endpoint": request.endpoint}
        self.requests.inc(1, tags | {"status": str(request.status)})
        self.duration.observe(request.duration_s, tags)
        for passed in request.soft_budgets:
            subject, _, budget = passed.partition(" soft ")
            self.soft_budget_passed.inc(1, {"subject": subject, "budget": budget})
        if request.model is None:
            return
        self._in_flight[request.model] -= 1
        self.in_flight.set(self._in_flight[request.model], {"model": request.model})
        if request.ttft_s is not None:
            self.ttft.observe(request.ttft_s, tags)
        if request.mean_token_gap_s is not None:
            self.mean_gap.observe(request.mean_token_gap_s, tags)
        if request.max_token_gap_s is not None:
            self.max_gap.observe(request.max_token_gap_s, tags)
        if request.prompt_tokens:
            self.prompt_tokens.inc(request.prompt_tokens, tags)
        if request.completion_tokens:
            self.completion_tokens.inc(request.completion_tokens, tags)


class EngineMetrics:
    def __init__(self) -> None:
        self.ttft = Histogram(
            "llm_engine_time_to_first_token_seconds",
            "Time from the replica receiving a request to the engine's first output.",
            boundaries=LATENCY_S,
            tag_keys=("model",),
        )
        self.duration = Histogram(
            "llm_engine_request_duration_seconds",
            "Time the replica spent on a request, engine included.",
            boundaries=LATENCY_S,
            tag_keys=("model",),
        )


class LedgerMetrics:
    """An ingress replica's usage rows not yet in the ledger: tagged by replica, since each holds
    its own (in memory, or on its node's disk while the ledger fails)."""

    def __init__(self, replica: str) -> None:
        self._tags = {"replica": replica}
        self.pending = Gauge(
            "llm_usage_rows_pending",
            "Usage rows an ingress replica holds that the ledger has not acknowledged yet, in memory or on disk.",
            tag_keys=("replica",),
        )
        self.dropped = Counter(
            "llm_usage_rows_dropped",
            "Usage rows an ingress replica dropped because its spill bound (usage.spill_max_rows) was reached.",
            tag_keys=("replica",),
        )
        self.failures = Counter(
            "llm_usage_write_failures",
            "Calls that should have stored usage rows in the ledger and failed or timed out (the rows are retried).",
            tag_keys=("replica",),
        )

    def waiting(self, rows: int) -> None:
        self.pending.set(rows, self._tags)

    def failed(self) -> None:
        self.failures.inc(1, self._tags)

    def lost(self, rows: int) -> None:
        if rows:
            self.dropped.inc(rows, self._tags)
