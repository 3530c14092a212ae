"""Autoscaling on the engine's signals without a cluster: the policy's decision over scripted
replica reports and a fake clock, the policy read from Serve's own `AutoscalingContext` and under
Serve's own wrapper (bounds, delays, a start from zero), the deployment options that install it,
and what the replica reports."""

from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.schema import ModelConfig
from serve_app.models.autoscaling import (
    KV_CACHE_USAGE,
    RUNNING,
    WAITING,
    EngineLoad,
    EngineSignalPolicy,
    Pressure,
    ReplicaSignals,
    Thresholds,
    decide,
)
from serve_app.models.deployment import deployment_options

LIMITS = Thresholds(max_wait_s=5, max_kv_cache_usage=0.9, look_back_s=10)
BUSY = ReplicaSignals(waiting=0, kv_cache_usage=0.3, idle=False)
IDLE = ReplicaSignals(waiting=0, kv_cache_usage=0.0, idle=True)


def waiting(count: float) -> ReplicaSignals:
    return ReplicaSignals(waiting=count, kv_cache_usage=0.3, idle=False)


def run(ticks: list[tuple[float, int, list[ReplicaSignals], float]], ongoing: float = 1) -> list[int]:
    """The wish at each (time, replicas running and wanted, reports, queued at handles), state
    carried over."""
    pressure, wishes = Pressure(), []
    for now, current, replicas, queued in ticks:
        wish, pressure = decide(current, current, replicas, queued, ongoing, now, pressure, LIMITS)
        wishes.append(wish)
    return wishes


def test_requests_waiting_in_an_engine_want_a_replica_once_they_have_waited_max_wait_s():
    ticks = [(t, 1, [waiting(3)], 0) for t in (100, 102, 104.9, 105, 110)]
    assert run(ticks) == [1, 1, 1, 2, 2]


def test_requests_queued_at_serves_handles_count_as_waiting_once_a_window_has_passed_settled():
    assert run([(t, 2, [BUSY, BUSY], 4) for t in (0, 6, 10, 14.9, 15)]) == [2, 2, 2, 2, 3]


def test_the_requests_that_waited_for_a_start_from_zero_do_not_start_a_second_replica():
    """Serve's queue still holds them in its mean when the first replica is up: one more replica
    would start for nothing. Requests waiting in its engine do ask for one at once."""
    cold = [(0, 0, [], 1), (40, 1, [], 1), (41, 1, [BUSY], 1), (46, 1, [BUSY], 1), (50.9, 1, [BUSY], 1)]
    assert run(cold) == [1, 1, 1, 1, 1]
    # A window after the replica came, requests still queued at the handles: from then on they wait.
    assert run([*cold, (51, 1, [BUSY], 1), (55.9, 1, [BUSY], 1), (56, 1, [BUSY], 1)])[-3:] == [1, 1, 2]
    assert run([*cold[:3], (44, 1, [waiting(2)], 1), (49, 1, [waiting(2)], 1)])[-2:] == [1, 2]


def test_a_replica_still_starting_is_kept_while_requests_queue_and_only_the_engines_queues_count():
    """Serve's queue holds the requests the new replica was started for, and is not counted until
    it is up: the wish stays at the target, neither dropping the replica nor adding another. With
    nothing queued it falls back to the running count: a replica that never starts is dropped."""
    pressure = Pressure()
    for now in (0, 20, 400):
        wish, pressure = decide(1, 2, [BUSY], 3, 1, now, pressure, LIMITS)
        assert (wish, pressure.waiting_since, pressure.settled_since) == (2, None, None)
    wish, pressure = decide(1, 2, [waiting(1)], 3, 1, 450, pressure, LIMITS)
    assert (wish, pressure.waiting_since) == (2, 450)
    assert decide(1, 2, [waiting(1)], 3, 1, 455, pressure, LIMITS)[0] == 2
    assert decide(1, 3, [waiting(1)], 3, 1, 455, pressure, LIMITS)[0] == 3
    assert decide(1, 2, [BUSY], 0, 1, 500, Pressure(), LIMITS)[0] == 1


def test_a_moment_in_serves_queue_is_no_wait():
    """Serve's count is a window's mean: one request queued briefly reads as a fraction all window long."""
    assert run([(t, 2, [BUSY, BUSY], 0.1) for t in (0, 6, 12, 29)]) == [2, 2, 2, 2]


def test_a_wait_that_stops_starts_the_count_again():
    ticks = [(0, 1, [waiting(1)], 0), (4, 1, [BUSY], 0), (5, 1, [waiting(1)], 0), (9, 1, [waiting(1)], 0)]
    assert run(ticks) == [1, 1, 1, 1]
    assert run([*ticks, (10, 1, [waiting(1)], 0)])[-1] == 2


def test_kv_cache_above_its_threshold_for_max_wait_s_wants_a_replica():
    full = ReplicaSignals(waiting=0, kv_cache_usage=0.95, idle=False)
    half = ReplicaSignals(waiting=0, kv_cache_usage=0.5, idle=False)
    assert run([(0, 2, [full, full], 0), (5, 2, [full, full], 0)]) == [2, 3]
    # The mean over the replicas, 0.725, is below the threshold.
    assert run([(0, 2, [full, half], 0), (5, 2, [full, half], 0)]) == [2, 2]


def test_no_replica_while_one_sits_idle_however_long_others_wait():
    """Requests waiting in one engine were sent before the idle replica came: another replica
    would sit idle too."""
    assert run([(0, 2, [waiting(5), IDLE], 0), (60, 2, [waiting(5), IDLE], 0)]) == [2, 2]


def test_an_idle_replica_is_dropped_once_nothing_waits():
    assert run([(0, 3, [BUSY, BUSY, IDLE], 0)]) == [2]
    assert run([(0, 2, [waiting(1), IDLE], 0)]) == [2]


def test_every_replica_idle_and_nothing_in_flight_wants_none():
    """Serve's wrapper then keeps min_replicas, and takes a model to zero only from one replica."""
    assert run([(0, 3, [IDLE, IDLE, IDLE], 0)], ongoing=0) == [0]
    assert run([(0, 3, [IDLE, IDLE, IDLE], 0)], ongoing=1) == [2]


def test_replicas_that_have_not_reported_are_neither_idle_nor_waiting():
    assert run([(0, 2, [IDLE], 0)], ongoing=0) == [1]
    assert run([(0, 2, [], 0), (10, 2, [], 0)]) == [2, 2]


def test_a_model_at_zero_wants_one_replica_when_anything_is_asked_of_it():
    assert run([(0, 0, [], 0)], ongoing=0) == [0]
    assert run([(0, 0, [], 0)], ongoing=2) == [1]


def _context(
    current: int,
    reports: dict[str, dict[str, list[float]]],
    *,
    ongoing: float,
    queued: float = 0,
    target: int | None = None,
    **state,
) -> AutoscalingContext:
    """Serve's context for `current` running replicas, each reporting `reports[replica][metric]`
    (its samples, a second apart; the aggregated value is their mean, as Serve's for a series of
    even steps)."""
    deployment = DeploymentID(name="model-m", app_name="app")
    replicas = [ReplicaID(f"r{index}", deployment) for index in range(current)]
    raw: dict[str, dict[ReplicaID, list[TimeStampedValue]]] = {}
    means: dict[str, dict[ReplicaID, float]] = {}
    for replica in replicas:
        for metric, samples in reports.get(replica.unique_id, {}).items():
            raw.setdefault(metric, {})[replica] = [TimeStampedValue(t, v) for t, v in enumerate(samples)]
            means.setdefault(metric, {})[replica] = sum(samples) / len(samples)
    config = AutoscalingConfig(min_replicas=0, max_replicas=3, upscale_delay_s=0, downscale_delay_s=0)
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name=deployment.name,
        app_name=deployment.app_name,
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=replicas,
        total_num_requests=ongoing,
        total_queued_requests=queued,
        aggregated_metrics=means,
        raw_metrics=raw,
        capacity_adjusted_min_replicas=0,
        capacity_adjusted_max_replicas=3,
        policy_state=state,
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=config,
    )


def test_the_policy_reads_the_latest_report_for_pressure_and_the_window_for_idleness():
    policy = EngineSignalPolicy(max_wait_s=5, max_kv_cache_usage=0.9, look_back_s=10)
    # r0's engine emptied at its last sample but held requests in the window: not idle.
    reports = {
        "r0": {WAITING: [2, 2, 0], RUNNING: [4, 4, 4], KV_CACHE_USAGE: [0.5, 0.5, 0.5]},
        "r1": {WAITING: [0, 0, 0], RUNNING: [0, 0, 0], KV_CACHE_USAGE: [0, 0, 0]},
    }
    unpressed = {"waiting_since": None, "kv_full_since": None, "settled_since": 1000.0}
    assert policy(_context(2, reports, ongoing=4)) == (1, unpressed)
    reports["r1"][RUNNING] = [0, 1, 0]
    assert policy(_context(2, reports, ongoing=4)) == (2, unpressed)


def test_the_policy_keeps_its_pressure_in_serves_policy_state():
    policy = EngineSignalPolicy(max_wait_s=5, max_kv_cache_usage=0.9, look_back_s=10)
    reports = {"r0": {WAITING: [1, 3], RUNNING: [8, 8], KV_CACHE_USAGE: [0.4, 0.4]}}
    first = policy(_context(1, reports, ongoing=11))
    assert first == (1, {"waiting_since": 1000.0, "kv_full_since": None, "settled_since": 1000.0})
    assert policy(_context(1, reports, ongoing=11, waiting_since=994.0))[0] == 2


def test_the_policy_counts_serves_queue_only_a_window_after_its_target_runs_and_reports():
    policy = EngineSignalPolicy(max_wait_s=5, max_kv_cache_usage=0.9, look_back_s=10)
    busy = {"r0": {WAITING: [0, 0], RUNNING: [8, 8], KV_CACHE_USAGE: [0.4, 0.4]}}
    # A second replica starting: kept, and the queue it was started for not counted.
    assert policy(_context(1, busy, ongoing=12, queued=4, target=2)) == (
        2,
        {"waiting_since": None, "kv_full_since": None, "settled_since": None},
    )
    # Its target up: the window starts; once it has passed, the queue waits.
    assert policy(_context(1, busy, ongoing=12, queued=4))[1]["settled_since"] == 1000.0
    assert policy(_context(1, busy, ongoing=12, queued=4, settled_since=990.0))[1]["waiting_since"] == 1000.0


def test_under_serves_wrapper_a_model_at_zero_starts_at_once_and_an_idle_one_goes_to_zero():
    wrapped = _apply_autoscaling_config(EngineSignalPolicy(max_wait_s=5, max_kv_cache_usage=0.9, look_back_s=10))
    assert wrapped(_context(0, {}, ongoing=1))[0] == 1
    idle = {"r0": {WAITING: [0, 0], RUNNING: [0, 0], KV_CACHE_USAGE: [0, 0]}}
    assert wrapped(_context(1, idle, ongoing=0))[0] == 0
    pressed = {"r0": {WAITING: [4, 4], RUNNING: [8, 8], KV_CACHE_USAGE: [0.5, 0.5]}}
    assert wrapped(_context(1, pressed, ongoing=12, waiting_since=990.0))[0] == 2


def _model(autoscaling: dict) -> ModelConfig:
    return ModelConfig.model_validate({"id": "m", "source": {"path": "/m"}, "deployment": {"autoscaling": autoscaling}})


def test_the_deployment_options_install_the_policy_with_the_thresholds():
    options = deployment_options(_model({"max_replicas": 4, "engine_signals": {"max_wait_s": 2}}))
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert config.policy.policy_function == "serve_app.models.autoscaling.EngineSignalPolicy"
    assert config.policy.policy_kwargs == {"max_wait_s": 2, "max_kv_cache_usage": 0.9, "look_back_s": 30}
    assert config.policy.get_policy().__name__ == "EngineSignalPolicy"
    assert (config.max_replicas, config.look_back_period_s) == (4, 30)


def test_without_engine_signals_serve_keeps_its_own_policy():
    options = deployment_options(_model({"max_replicas": 4, "target_ongoing_requests": 8}))
    config = AutoscalingConfig(**options["autoscaling_config"])
    assert config.policy.is_default_policy_function()
    assert config.target_ongoing_requests == 8


def test_a_replica_reports_its_engines_load_under_the_policys_names():
    assert EngineLoad(waiting=3, running=5, kv_cache_usage=0.25).metrics() == {
        WAITING: 3,
        RUNNING: 5,
        KV_CACHE_USAGE: 0.25,
    }
