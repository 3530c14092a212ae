"""The relay benchmark's accounting, without Ray or a model: which process's CPU counts as the
serving layers', Ray's or the engine's, read from process tables as psutil describes them."""

import math

import pytest

from bench import relay
from bench.relay import ENGINE, IDLE, RAY, SERVING, Proc

PYTHON = "/work/.venv/bin/python"
SITE = "/work/.venv/lib/python3.11/site-packages/ray"


def _proc(pid: int, ppid: int, *argv: str, cpu_s: float = 0.0, started: float = 100.0) -> Proc:
    return Proc(pid=pid, ppid=ppid, started=started, argv=argv, cpu_s=cpu_s)


def _table(*procs: Proc) -> dict[int, Proc]:
    return {proc.pid: proc for proc in procs}


# Two applications side by side in one Serve instance, as both of our layouts run.
RAY_NODE = _table(
    _proc(10, 1, f"{SITE}/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/ray/x/logs"),
    _proc(11, 1, f"{SITE}/core/src/ray/raylet/raylet", "--gcs-address=127.0.0.1:1"),
    _proc(12, 1, PYTHON, "-u", f"{SITE}/_private/log_monitor.py", "--logs-dir=x"),
    _proc(13, 1, PYTHON, "-u", f"{SITE}/autoscaler/_private/monitor.py", "--logs-dir=x"),
    _proc(14, 1, PYTHON, "-m", "ray.util.client.server", "--address=127.0.0.1:1"),
    _proc(15, 11, "ray::DashboardAgent"),
    _proc(16, 11, "ray::ServeController.listen_for_change"),
    _proc(17, 11, "ray::ProxyActor"),
    _proc(18, 11, "ray::ServeReplica:colocated:model-smollm2.handle_request_streaming"),
    _proc(19, 18, "VLLM::EngineCore"),
    _proc(20, 19, "VLLM::Worker_TP0"),
    _proc(21, 18, PYTHON, "-c", "from multiprocessing.resource_tracker import main;main(7)"),
    _proc(22, 11, "ray::ServeReplica:two-deployments:ingress"),
    _proc(23, 11, "ray::ServeReplica:two-deployments:model-smollm2"),
    _proc(24, 23, "VLLM::EngineCore"),
    _proc(25, 11, "ray::_Limits"),
    _proc(26, 11, "ray::IDLE"),
    _proc(30, 2, PYTHON, "/work/.venv/bin/serve", "run", "/tmp/x.yaml"),
)


@pytest.mark.parametrize(
    ("pid", "expected"),
    [
        (10, (RAY, "gcs_server")),
        (11, (RAY, "raylet")),
        (12, (RAY, "log_monitor")),  # not the autoscaler's monitor.py
        (13, (RAY, "autoscaler monitor")),
        (14, (RAY, "Ray client server")),
        (15, (RAY, "DashboardAgent")),
        (16, (RAY, "Serve controller")),  # the method it runs is not part of its name
        (26, (RAY, "idle Ray workers")),
        (30, (RAY, "serve run")),
        (17, (SERVING, relay.PROXY)),
        (18, (SERVING, "replica model-smollm2")),
        (25, (SERVING, "actor _Limits")),  # the rate limiter's actor is ours, not Ray's
        (19, (ENGINE, "EngineCore")),
        (20, (ENGINE, "Worker")),
        (21, (SERVING, "replica model-smollm2")),  # a helper counts with the replica that started it
        (22, (IDLE, "two-deployments: ingress")),  # the application not under load
        (24, (IDLE, "two-deployments: model-smollm2")),  # and its engine
    ],
)
def test_each_process_of_a_ray_node_is_put_in_its_group(pid, expected):
    assert relay.role(pid, RAY_NODE, app="colocated") == expected


def test_the_other_application_is_the_one_counted_when_it_is_measured():
    assert relay.role(22, RAY_NODE, app="two-deployments") == (SERVING, "replica ingress")
    assert relay.role(24, RAY_NODE, app="two-deployments") == (ENGINE, "EngineCore")
    assert relay.role(19, RAY_NODE, app="two-deployments")[0] == IDLE


def test_bare_vllm_is_its_api_server_but_for_the_engine():
    server = _table(
        _proc(40, 2, PYTHON, "-m", "bench.vllm_cli", "serve", "/models/smollm2"),
        _proc(41, 40, "VLLM::EngineCore"),
        _proc(42, 40, PYTHON, "-c", "from multiprocessing.resource_tracker import main;main(9)"),
    )
    assert relay.role(40, server, app=None) == (SERVING, relay.API_SERVER)
    assert relay.role(41, server, app=None) == (ENGINE, "EngineCore")
    assert relay.role(42, server, app=None) == (SERVING, relay.API_SERVER)


def test_a_ray_process_nothing_names_is_not_counted_as_serving():
    node = _table(_proc(50, 1, PYTHON, "some_script.py"))
    assert relay.role(50, node, app="llm") == (IDLE, "some_script.py")


def test_a_parent_loop_in_the_table_ends_the_walk():
    node = _table(_proc(60, 61, PYTHON, "x.py"), _proc(61, 60, PYTHON, "y.py"))
    assert relay.role(60, node, app=None) == (SERVING, relay.API_SERVER)


def test_a_replica_title_gives_its_application_and_deployment():
    assert relay.replica(("ray::ServeReplica:llm:LLMServer:smollm2",)) == ("llm", "LLMServer:smollm2")
    assert relay.replica(("ray::ServeReplica:llm:model-qwen2.5-7b",)) == ("llm", "model-qwen2.5-7b")
    assert relay.replica(("ray::ServeReplica:a:key-registry.handle_request_with_rejection",)) == ("a", "key-registry")
    assert relay.replica(("ray::ProxyActor",)) is None


def test_cpu_is_counted_over_the_window_and_a_new_process_from_zero():
    before = _table(_proc(1, 0, "a", cpu_s=5.0), _proc(2, 0, "b", cpu_s=7.0), _proc(3, 0, "gone", cpu_s=9.0))
    after = _table(
        _proc(1, 0, "a", cpu_s=6.5),
        _proc(2, 0, "b-again", cpu_s=0.25, started=200.0),  # the pid reused by a new process
        _proc(4, 0, "new", cpu_s=0.75),
    )
    assert relay.cpu_deltas(before, after) == {1: 1.5, 2: 0.25, 4: 0.75}


def test_a_tally_sums_by_group_and_label():
    before = {pid: proc for pid, proc in RAY_NODE.items()}
    after = {pid: Proc(p.pid, p.ppid, p.started, p.argv, p.cpu_s + pid / 100) for pid, p in RAY_NODE.items()}
    spent = relay.tally(before, after, app="colocated")
    assert spent[SERVING]["replica model-smollm2"] == pytest.approx(0.18 + 0.21)
    assert spent[ENGINE] == pytest.approx({"EngineCore": 0.19, "Worker": 0.20})
    assert spent[IDLE]["two-deployments: model-smollm2"] == pytest.approx(0.23 + 0.24)
    assert sum(map(sum, (group.values() for group in spent.values()))) == pytest.approx(
        sum(RAY_NODE) / 100
    )  # every process counted once


def _reading(system: str, concurrency: int, serving_s: float, tokens: int = 1000, layout: str = "") -> relay.Reading:
    return relay.Reading(
        system=system,
        layout=layout,
        route="/llm",
        concurrency=concurrency,
        requests=10,
        errors=0,
        tokens=tokens,
        elapsed_s=10.0,
        cpu_s={SERVING: {relay.PROXY: serving_s / 2, "replica ingress": serving_s / 2}, ENGINE: {"EngineCore": 9.0}},
    )


def test_the_ratio_is_to_bare_vllm_at_the_same_concurrency():
    readings = [_reading(relay.BARE, 1, 1.0), _reading(relay.BARE, 16, 2.0), _reading("ours", 16, 3.0, tokens=2000)]
    assert relay.ratio_to_bare(readings, readings[2]) == pytest.approx((3.0 / 2) / 2.0)
    assert relay.ratio_to_bare(readings, readings[0]) is None
    assert math.isnan(_reading("ours", 1, 1.0, tokens=0).per_1k(SERVING))


def test_targets_are_told_for_each_layout_against_both_peers():
    readings = [
        _reading(relay.BARE, 1, 1.0),
        _reading("Ray Serve LLM", 1, 1.5),
        _reading("ours", 1, 1.2, layout="colocated"),
        _reading("ours", 1, 1.3, layout="apart"),
        _reading("ours", 4, 9.0, layout="apart"),  # no target at this concurrency
    ]
    told = relay.targets(readings)
    assert told == [
        "- ours, colocated, concurrency 1: 1.20 × bare vLLM's (met); below Ray Serve LLM's 1.500 s (met)",
        "- ours, apart, concurrency 1: 1.30 × bare vLLM's (missed); below Ray Serve LLM's 1.500 s (met)",
    ]


def test_the_program_of_an_interpreter_is_its_script_or_module():
    assert relay.program((PYTHON, "-u", "/x/log_monitor.py")) == "log_monitor.py"
    assert relay.program((PYTHON, "-m", "ray.util.client.server")) == "ray.util.client.server"
    assert relay.program(("/x/raylet", "--flag")) == "raylet"
    assert relay.program(()) == ""
