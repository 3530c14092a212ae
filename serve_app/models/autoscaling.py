"""Autoscaling on the engine's own signals: what each model replica reports to Serve's controller
(its engine's waiting and running requests, and its KV-cache usage) and the policy the controller
runs on those reports at every tick of its control loop.

The policy is Serve's custom `AutoscalingPolicy` (`autoscaling_config.policy`), made once per
deployment with the config's thresholds. Serve pickles this module by value into its controller,
which is why it imports nothing of vLLM or of the application. Serve wraps the policy's answer in
the usual rules: bounded by `min_replicas` and `max_replicas`, applied once the wish has lasted
`upscale_delay_s` or `downscale_delay_s`, and a model at zero replicas given one at once when a
request waits for it (the policy is not asked then). Its own decision is `decide`, a pure
function of the replicas' signals, the time and its state from the previous tick."""

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.config import AutoscalingContext

WAITING = "llm_engine_waiting_requests"
RUNNING = "llm_engine_running_requests"
KV_CACHE_USAGE = "llm_engine_kv_cache_usage"


@dataclass(frozen=True)
class EngineLoad:
    """What one engine holds now, as its replica reports it to Serve's controller."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    """The share of the KV cache's blocks in use, 0 to 1 (cached blocks no request holds are free)."""

    def metrics(self) -> dict[str, float]:
        return {WAITING: self.waiting, RUNNING: self.running, KV_CACHE_USAGE: self.kv_cache_usage}


@dataclass(frozen=True)
class ReplicaSignals:
    """One replica's reports as the policy reads them: its latest, for what presses now, and
    whether its engine held no request at all through Serve's look-back window (a replica the load
    does not need; one instant's idleness would be every replica's, now and then, under load)."""

    waiting: float
    kv_cache_usage: float
    idle: bool


@dataclass(frozen=True)
class Pressure:
    """Since when (the controller's clock) requests have been waiting, the KV cache above its
    threshold, and every replica of the model up and reporting; None while not. The policy's
    state from one tick to the next."""

    waiting_since: float | None = None
    kv_full_since: float | None = None
    settled_since: float | None = None


@dataclass(frozen=True)
class Thresholds:
    max_wait_s: float
    max_kv_cache_usage: float
    look_back_s: float
    """Serve's look-back window, over which it averages the requests queued at the handles."""


def decide(
    current: int,
    target: int,
    replicas: Sequence[ReplicaSignals],
    queued: float,
    ongoing: float,
    now: float,
    pressure: Pressure,
    thresholds: Thresholds,
) -> tuple[int, Pressure]:
    """The number of replicas the model wants, and the pressure to remember.

    `current` replicas run, of the `target` Serve is bringing the model to; `replicas` are the
    running ones that have reported (a replica just started may not have); `queued` is
    Serve's count of requests waiting at the callers' handles for a replica with room, `ongoing`
    its count of requests in flight, queued ones included. One more replica once requests have
    waited (in an engine's queue or in Serve's) for `max_wait_s`, or the mean KV-cache usage has
    stayed above `max_kv_cache_usage` for as long, unless a replica is idle: an idle replica has
    room, and requests waiting elsewhere were sent before it came, so another would sit idle too.
    One fewer when nothing waits and a replica is idle; none (Serve keeps `min_replicas`) when
    every replica is idle and nothing is in flight. Otherwise a replica still starting is kept
    while requests queue at the handles (those it was started for; they do not count as waiting
    until it is up), and dropped after Serve's downscale delay once none do.

    `queued` is Serve's mean over its look-back window, so a request queued for a moment keeps
    it above 0 for the whole window: only a mean of one or more (a request waiting all along, or
    several for part of it) counts as waiting. And it counts only once a whole window has passed
    with the model settled (its target running, every replica reporting): before that, the mean
    holds the requests that waited for a replica to start (after a start from zero, every
    request), which one more replica would not have served sooner."""
    settled_since = _since(pressure.settled_since, now, 0 < current == target == len(replicas))
    queueing = queued >= 1
    queue_counts = queueing and _lasted(settled_since, now, thresholds.look_back_s)
    waiting = (queued if queue_counts else 0.0) + sum(replica.waiting for replica in replicas)
    kv_usage = sum(replica.kv_cache_usage for replica in replicas) / len(replicas) if replicas else 0.0
    pressure = Pressure(
        waiting_since=_since(pressure.waiting_since, now, waiting > 0),
        kv_full_since=_since(pressure.kv_full_since, now, kv_usage > thresholds.max_kv_cache_usage),
        settled_since=settled_since,
    )
    if current == 0:
        return (1 if ongoing > 0 or waiting > 0 else 0), pressure
    idle = sum(replica.idle for replica in replicas)
    pressed = _lasted(pressure.waiting_since, now, thresholds.max_wait_s) or _lasted(
        pressure.kv_full_since, now, thresholds.max_wait_s
    )
    if pressed and idle == 0:
        return max(current + 1, target), pressure
    if waiting == 0 and idle:
        return (0 if idle == current and ongoing == 0 else current - 1), pressure
    return (target if queueing else current), pressure


def _since(since: float | None, now: float, pressing: bool) -> float | None:
    if not pressing:
        return None
    return now if since is None else since


def _lasted(since: float | None, now: float, seconds: float) -> bool:
    return since is not None and now - since >= seconds


class EngineSignalPolicy:
    """Serve's controller makes one per deployment, with the config's `engine_signals` as
    `policy_kwargs`, and calls it at every tick."""

    def __init__(self, max_wait_s: float, max_kv_cache_usage: float, look_back_s: float) -> None:
        self._thresholds = Thresholds(max_wait_s, max_kv_cache_usage, look_back_s)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        state = ctx.policy_state
        desired, pressure = decide(
            ctx.current_num_replicas,
            ctx.target_num_replicas,
            replica_signals(ctx),
            ctx.total_queued_requests or 0.0,
            ctx.total_num_requests,
            time.time() if ctx.current_time is None else ctx.current_time,
            Pressure(state.get("waiting_since"), state.get("kv_full_since"), state.get("settled_since")),
            self._thresholds,
        )
        return desired, dataclasses.asdict(pressure)


def replica_signals(ctx: AutoscalingContext) -> list[ReplicaSignals]:
    """The running replicas' reports: the latest of each series (Serve's raw metrics), and the
    engine's requests averaged over the look-back window (its aggregated metrics), which is 0 only
    if the engine held none at any sample of it."""
    latest = ctx.raw_metrics or {}
    means = ctx.aggregated_metrics or {}
    signals = []
    for replica in ctx.running_replicas:
        waiting = latest.get(WAITING, {}).get(replica)
        if not waiting:
            continue
        kv_usage = latest.get(KV_CACHE_USAGE, {}).get(replica)
        held = means.get(WAITING, {}).get(replica, 0.0) + means.get(RUNNING, {}).get(replica, 0.0)
        signals.append(ReplicaSignals(waiting[-1].value, kv_usage[-1].value if kv_usage else 0.0, held == 0))
    return signals
