"""A request's record (`RequestLifecycle`): finished once, with the timings its `Answer` saw, told
to every listener; and the ingress metrics as one of those listeners (Ray's metric objects work
without a cluster: they check their tags, and record nothing until Ray runs)."""

import logging
from types import SimpleNamespace

import pytest

from serve_app.http import lifecycle as lifecycle_module
from serve_app.http.lifecycle import Listeners, RequestLifecycle
from serve_app.telemetry import record as record_module
from serve_app.telemetry.metrics import IngressMetrics
from serve_app.telemetry.record import CLIENT_CLOSED_REQUEST, Answer, FinishedRequest
from tests.captured_logs import serve_records


class Clock:
    """`time.perf_counter` and `time.time` for the lifecycle and its answer, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000 + self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    fake_time = SimpleNamespace(perf_counter=clock.perf_counter, time=clock.time)
    monkeypatch.setattr(lifecycle_module, "time", fake_time)
    monkeypatch.setattr(record_module, "time", fake_time)
    return clock


def test_the_record_has_the_requests_fields_and_the_timings_its_answer_saw(clock):
    finished: list[FinishedRequest] = []
    lifecycle = RequestLifecycle("rid", "/llm", Listeners(finished=(finished.append,)))
    lifecycle.key_name = "k"
    lifecycle.routed("m")
    lifecycle.reached_engine = True
    for at in (100.5, 100.7, 101.1):
        clock.now = at
        lifecycle.answer.token()
    lifecycle.answer.usage({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    lifecycle.answer.finish_reason = "length"
    clock.now = 102.0
    done = lifecycle.finish(200)
    assert finished == [done]
    assert (done.request_id, done.endpoint, done.key_name, done.model, done.status) == ("rid", "/llm", "k", "m", 200)
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens, done.finish_reason) == (4, 3, 7, "length")
    assert done.started_at == 1_700_000_100
    assert done.duration_s == pytest.approx(2.0)
    assert done.ttft_s == pytest.approx(0.5)
    assert done.mean_token_gap_s == pytest.approx(0.3)  # (101.1 - 100.5) over two gaps
    assert done.reached_engine is True


def test_a_request_without_tokens_has_no_ttft_nor_token_gap_and_one_token_no_gap(clock):
    silent = RequestLifecycle("a", "/v1/models", Listeners())
    clock.now = 100.25
    done = silent.finish(200)
    assert (done.ttft_s, done.mean_token_gap_s, done.model, done.key_name) == (None, None, None, None)
    assert done.reached_engine is False and done.duration_s == pytest.approx(0.25)
    single = RequestLifecycle("b", "/llm", Listeners())
    clock.now = 101.0
    single.answer.token()
    done = single.finish(200)
    assert done.ttft_s == pytest.approx(0.75) and done.mean_token_gap_s is None


def test_finish_is_decided_by_the_first_call_and_listeners_hear_once(clock):
    heard, own = [], []
    lifecycle = RequestLifecycle("rid", "/llm", Listeners(finished=(heard.append,)))
    lifecycle.on_finish(own.append)
    first = lifecycle.finish(500)
    lifecycle.answer.completion_tokens = 99
    clock.now += 5
    again = lifecycle.finish(CLIENT_CLOSED_REQUEST)
    assert again is first and lifecycle.finished is first
    assert first.status == 500 and first.completion_tokens == 0
    assert heard == [first] and own == [first]


def test_routed_tells_each_routed_listener_the_model():
    told_a, told_b = [], []
    lifecycle = RequestLifecycle("rid", "/llm", Listeners(routed=(told_a.append, told_b.append)))
    lifecycle.routed("qwen")
    assert (told_a, told_b, lifecycle.model) == (["qwen"], ["qwen"], "qwen")
    assert lifecycle.finish(200).model == "qwen"


def test_the_ingress_listeners_hear_first_then_the_requests_own_in_order():
    order = []
    listeners = Listeners(finished=(lambda _: order.append("log"), lambda _: order.append("metrics")))
    lifecycle = RequestLifecycle("rid", "/llm", listeners)
    lifecycle.on_finish(lambda _: order.append("lease"))
    lifecycle.on_finish(lambda _: order.append("second own"))
    lifecycle.finish(200)
    assert order == ["log", "metrics", "lease", "second own"]


def test_a_failing_listener_is_logged_and_the_others_still_hear():
    heard = []

    def broken(_):
        raise RuntimeError("bug in a listener")

    lifecycle = RequestLifecycle("rid-9", "/llm", Listeners(finished=(broken, heard.append)))
    lifecycle.on_finish(broken)
    lifecycle.on_finish(heard.append)
    with serve_records() as records:
        done = lifecycle.finish(200)
    assert heard == [done, done]
    errors = records.at(logging.ERROR)
    assert [r.getMessage() for r in errors] == ["a listener of request rid-9 failed"] * 2
    assert all(isinstance(r.exc_info[1], RuntimeError) for r in errors)


@pytest.mark.parametrize(
    "failed_with, complete, status",
    [(None, True, 200), (None, False, CLIENT_CLOSED_REQUEST), (503, False, 503), (500, True, 500)],
)
def test_a_streams_status_is_its_failure_else_200_if_complete_else_499(failed_with, complete, status):
    answer = Answer(complete=complete)
    if failed_with is not None:
        answer.fail(failed_with)
        assert answer.finish_reason == "error"
    assert answer.stream_status() == status


def test_usage_keeps_the_last_count_and_ignores_chunks_without_it():
    answer = Answer()
    answer.usage({"prompt_tokens": 3, "completion_tokens": 1})
    answer.usage(None)
    answer.usage({})
    assert (answer.prompt_tokens, answer.completion_tokens) == (3, 1)
    answer.usage({"prompt_tokens": 3, "completion_tokens": None})
    assert answer.completion_tokens == 0


# The metrics as a listener.


class _Metric:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict]] = []

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append((value, tags))

    observe = set = inc


def _fake_metrics() -> IngressMetrics:
    metrics = IngressMetrics()
    for name in (
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "ttft",
        "mean_gap",
        "max_gap",
        "duration",
        "in_flight",
        "soft_budget_passed",
    ):
        setattr(metrics, name, _Metric())
    return metrics


def _record(**fields) -> FinishedRequest:
    base = dict(
        request_id="r",
        endpoint="/llm",
        key_name="k",
        model="m",
        status=200,
        prompt_tokens=4,
        completion_tokens=6,
        finish_reason="stop",
        started_at=0.0,
        duration_s=1.5,
        ttft_s=0.2,
        mean_token_gap_s=0.05,
        reached_engine=True,
        max_token_gap_s=0.3,
    )
    return FinishedRequest(**(base | fields))


def test_metrics_count_a_finished_request_once_with_its_tags():
    metrics = _fake_metrics()
    metrics.request_routed("m")
    metrics.request_finished(_record())
    tags = {"model": "m", "key": "k", "endpoint": "/llm"}
    assert metrics.requests.calls == [(1, tags | {"status": "200"})]
    assert metrics.duration.calls == [(1.5, tags)]
    assert metrics.ttft.calls == [(0.2, tags)] and metrics.mean_gap.calls == [(0.05, tags)]
    assert metrics.max_gap.calls == [(0.3, tags)]
    assert metrics.prompt_tokens.calls == [(4, tags)] and metrics.completion_tokens.calls == [(6, tags)]
    assert metrics.in_flight.calls == [(1, {"model": "m"}), (0, {"model": "m"})]
    assert metrics.soft_budget_passed.calls == []


def test_metrics_count_each_soft_budget_a_request_was_admitted_past():
    metrics = _fake_metrics()
    metrics.request_finished(_record(soft_budgets=("key:k soft tokens_per_day", "tenant:acme soft spend_per_month")))
    assert metrics.soft_budget_passed.calls == [
        (1, {"subject": "key:k", "budget": "tokens_per_day"}),
        (1, {"subject": "tenant:acme", "budget": "spend_per_month"}),
    ]


def test_metrics_in_flight_counts_each_model_apart():
    metrics = _fake_metrics()
    for model in ("a", "a", "b"):
        metrics.request_routed(model)
    metrics.request_finished(_record(model="a"))
    assert metrics.in_flight.calls == [
        (1, {"model": "a"}),
        (2, {"model": "a"}),
        (1, {"model": "b"}),
        (1, {"model": "a"}),
    ]


def test_metrics_of_a_request_never_routed_count_it_without_touching_in_flight():
    metrics = _fake_metrics()
    metrics.request_finished(_record(model=None, key_name=None, status=401, ttft_s=None, mean_token_gap_s=None))
    assert metrics.requests.calls == [(1, {"model": "-", "key": "-", "endpoint": "/llm", "status": "401"})]
    assert metrics.in_flight.calls == [] and metrics.ttft.calls == [] and metrics.prompt_tokens.calls == []


def test_metrics_skip_what_a_request_did_not_have():
    metrics = _fake_metrics()
    metrics.request_routed("m")
    metrics.request_finished(
        _record(ttft_s=None, mean_token_gap_s=None, max_token_gap_s=None, prompt_tokens=0, completion_tokens=0)
    )
    assert (
        metrics.ttft.calls
        == metrics.mean_gap.calls
        == metrics.max_gap.calls
        == metrics.prompt_tokens.calls
        == metrics.completion_tokens.calls
        == []
    )
    assert len(metrics.requests.calls) == 1 and len(metrics.duration.calls) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"model": None, "key_name": None, "ttft_s": None, "mean_token_gap_s": None},
        {"status": 499, "prompt_tokens": 0},
        {"soft_budgets": ("tenant:acme soft tokens_per_day",), "tenant": "acme", "cost": 0.5},
    ],
)
def test_the_real_metric_objects_take_the_tags_given(fields):
    """Ray's metrics check every tag key and value type, cluster or not."""
    metrics = IngressMetrics()
    if fields.get("model", "m") is not None:
        metrics.request_routed("m")
    metrics.request_finished(_record(**fields))


def test_the_lifecycle_feeds_the_metrics_through_its_listeners(clock):
    metrics = _fake_metrics()
    lifecycle = RequestLifecycle(
        "rid", "/v1/chat/completions", Listeners(routed=(metrics.request_routed,), finished=(metrics.request_finished,))
    )
    lifecycle.key_name = "k"
    lifecycle.routed("m")
    clock.now = 100.4
    lifecycle.answer.token()
    clock.now = 101.0
    lifecycle.finish(200)
    lifecycle.finish(500)
    tags = {"model": "m", "key": "k", "endpoint": "/v1/chat/completions"}
    assert metrics.requests.calls == [(1, tags | {"status": "200"})]
    assert metrics.ttft.calls == [(pytest.approx(0.4), tags)]
    assert metrics.in_flight.calls == [(1, {"model": "m"}), (0, {"model": "m"})]
