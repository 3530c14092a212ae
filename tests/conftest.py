"""One Ray cluster and one Serve instance per test session, shared by every end-to-end test:
the real application from configs/local.yaml (real vLLM, real model) at `/`, and the same
application on a test engine at `/fake` for plumbing tests that need failures on demand."""

import hashlib
import os
import secrets
from pathlib import Path

import cloudpickle
import httpx
import pytest

from cluster.load import load
from cluster.runtime import NODE_ENV
from cluster.schema import ClusterConfig, UsageSettings
from tests.polling import until
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-" + secrets.token_hex(8)
FAKE_KEY = "sk-fake-" + secrets.token_hex(8)
FAKE_ADMIN_KEY = "sk-fake-admin-" + secrets.token_hex(8)


METRICS_PORT = None


@pytest.fixture(scope="session")
def serve_url():
    import ray
    from ray import serve

    global METRICS_PORT
    os.environ["LLM_API_KEY"] = API_KEY
    # Ray's and Serve's settings as `make serve` runs it (the Ray processes started here inherit them).
    os.environ.update(NODE_ENV)
    METRICS_PORT = free_port()
    # Extra logical CPUs: the model replica takes one, light deployments take slivers. Metrics
    # are reported every second instead of every ten, so that tests can read them soon.
    # `address="local"`: a cluster of this session's own, even where another one runs on the host
    # (a `ray start` cluster would otherwise be joined).
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": {"LLM_API_KEY": API_KEY}},
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_url):
    """Ray's Prometheus endpoint on this (only) node."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def llm_url(serve_url, tmp_path_factory):
    """The shipped local config, deployed as `serve run configs/local.yaml` would, with its usage
    ledger in a temporary file."""
    from ray import serve

    from serve_app.app import build_app

    config = load(ROOT / "configs" / "local.yaml").apps["llm"]
    config = config.model_copy(update={"usage": ledger_in(tmp_path_factory.mktemp("llm"))})
    serve.run(build_app(config), name="llm", route_prefix="/")
    return serve_url


@pytest.fixture(scope="session")
def fake_url(serve_url, tmp_path_factory):
    serve_fake(fake_config(tmp_path_factory.mktemp("fake")), "fake")
    return serve_url + "/fake"


def serve_fake(config: ClusterConfig, name: str) -> None:
    """Deploys a config on the test engine at `/<name>`."""
    from ray import serve

    import tests.fake_engine
    from serve_app.app import build_graph

    cloudpickle.register_pickle_by_value(tests.fake_engine)
    serve.run(build_graph(config, tests.fake_engine.fake_engine), name=name, route_prefix=f"/{name}")


REPLICA_START_S = 240
"""The longest a wait that includes a replica's start may take: a replica of the test engine, like
the ingress's, imports vLLM (its request types) before it runs, which under the suite's load on two
cores takes a minute or more, and several start at once."""


def delete_app(name: str, timeout_s: float = REPLICA_START_S + 60) -> None:
    """`serve.delete`, waiting longer than its own fixed 60 s: Serve stops a replica that is still
    starting only once it has started (REPLICA_START_S), then gives it its shutdown."""
    from ray import serve

    serve.delete(name, _blocking=False)
    until(
        lambda: name not in serve.status().applications, timeout_s, f"application {name!r} to be deleted", every_s=0.5
    )


def ledger_in(folder: Path) -> UsageSettings:
    return UsageSettings(database=f"sqlite:///{folder / 'usage.sqlite'}")


def fake_config(folder: Path) -> ClusterConfig:
    deployment = {"num_cpus": 0.1, "num_replicas": 1}
    return ClusterConfig.model_validate(
        {
            "default_model": "fake-b",
            "usage": ledger_in(folder).model_dump(),
            "auth": {
                "keys": [
                    {"name": "fake", "sha256": hashlib.sha256(FAKE_KEY.encode()).hexdigest()},
                    # For the fuzzing of the admin routes (tests/test_fuzz_http.py).
                    {
                        "name": "fake-admin",
                        "sha256": hashlib.sha256(FAKE_ADMIN_KEY.encode()).hexdigest(),
                        "scopes": ["admin"],
                    },
                ]
            },
            "ingress": {"max_tokens_limit": 64},
            "models": [
                {"id": "fake-a", "aliases": ["a"], "source": {"path": "/nonexistent"}, "deployment": deployment},
                {"id": "fake-b", "source": {"path": "/nonexistent"}, "deployment": deployment},
            ],
        }
    )


@pytest.fixture
def client(llm_url):
    with httpx.Client(base_url=llm_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture
def fake_client(fake_url):
    with httpx.Client(base_url=fake_url, headers={"Authorization": f"Bearer {FAKE_KEY}"}, timeout=30) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that talk to the real engine and model say so: `-m real_engine` selects them."""
    for item in items:
        if "llm_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_engine)
