"""The usage ledger under faults, through HTTP on a real Ray cluster and the test engine: its
database locked against writes for a while (as a full disk, a long migration or a Postgres
failover would) and its replica killed in the middle of a write; then no row is lost, none is
doubled, and the totals equal the usage the clients were told. A 5,000-character `x-request-id`
is stored, bounded, with the rest of its batch."""

import hashlib
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray

from cluster.schema import ClusterConfig
from serve_app.tenancy.usage_store import bounded
from tests.conftest import delete_app, ledger_in, serve_fake
from tests.polling import until
from tests.test_e2e_observability import scrape

pytestmark = pytest.mark.e2e

APP = "ledger-faults"
USER, ADMIN = (f"sk-{name}-{secrets.token_hex(8)}" for name in ("user", "admin"))


@pytest.fixture(scope="module")
def app(serve_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ledger-faults")
    usage = ledger_in(folder).model_copy(update={"flush_interval_s": 0.2})
    deployment = {"num_cpus": 0.05, "num_replicas": 1}
    config = ClusterConfig.model_validate(
        {
            "usage": usage.model_dump(),
            "ingress": {"num_cpus": 0.05},
            "auth": {
                "keys": [
                    {"name": "user", "sha256": hashlib.sha256(USER.encode()).hexdigest()},
                    {"name": "admin", "sha256": hashlib.sha256(ADMIN.encode()).hexdigest(), "scopes": ["admin"]},
                ]
            },
            "models": [{"id": "fake-ledger", "source": {"path": "/nonexistent"}, "deployment": deployment}],
        }
    )
    serve_fake(config, APP)
    yield f"{serve_url}/{APP}", Path(usage.database.removeprefix("sqlite:///")), config
    delete_app(APP)


def _ask(url: str, index: int, request_id: str) -> dict:
    """One request (whole or streamed, /llm or OpenAI's), and the usage its client was told."""
    words = " ".join(f"w{n}" for n in range(index % 5 + 1))
    headers = {"Authorization": f"Bearer {USER}", "x-request-id": request_id}
    body = {"messages": [{"role": "user", "content": words}]}
    if index % 2:
        response = httpx.post(f"{url}/llm", json=body, headers=headers, timeout=30)
    else:
        response = httpx.post(
            f"{url}/v1/chat/completions", json=body | {"model": "fake-ledger"}, headers=headers, timeout=30
        )
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _ask_all(url: str, ids: list[str], first: int = 0) -> list[dict]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda pair: _ask(url, *pair), enumerate(ids, first)))


def _usage(url: str, since: float) -> dict | None:
    response = httpx.get(
        f"{url}/admin/usage",
        params={"since": since, "key": "user", "group_by": ""},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    if response.status_code != 200:
        return None  # the ledger is not answering (yet)
    rows = response.json()["data"]
    return rows[0] if rows else {"requests": 0}


def _ledger_replicas() -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#usage-ledger#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _stored(database: Path, since: float) -> list[tuple[str, int, int]]:
    with sqlite3.connect(database) as db:
        return db.execute(
            "select request_id, prompt_tokens, completion_tokens from usage where key = 'user' and time >= ?",
            (since,),
        ).fetchall()


def _pending(metrics_url: str) -> float:
    return max(
        (value for (name, _), value in scrape(metrics_url).items() if name == "ray_llm_usage_rows_pending"),
        default=0,
    )


def test_a_locked_database_and_a_killed_ledger_lose_and_double_nothing(app, metrics_url):
    url, database, config = app
    spill = Path(config.usage.spill_directory).expanduser() / APP
    since = time.time()
    run = secrets.token_hex(4)
    long_id = f"long-{run}-".ljust(5000, "x")
    ids = [f"fault-{run}-{index}" for index in range(24)] + [long_id]

    locker = sqlite3.connect(database, isolation_level=None, timeout=30)
    locker.execute("BEGIN EXCLUSIVE")  # no writer but this one until it ends
    try:
        told = _ask_all(url, ids[:12])
        until(lambda: list(spill.glob("*.jsonl")), 30, "rows to wait on the ingress replica's disk")
        until(lambda: _pending(metrics_url) >= 12, 15, "llm_usage_rows_pending to count the waiting rows")
        # The ledger's replica is in a write, waiting on the lock: killed there.
        [replica] = _ledger_replicas()
        ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
        told += _ask_all(url, ids[12:], first=12)
        until(lambda: _ledger_replicas() not in ([], [replica]), 60, "Serve to replace the ledger's replica")
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    expected = {
        "requests": len(ids),
        "failed_requests": 0,
        "prompt_tokens": sum(u["prompt_tokens"] for u in told),
        "completion_tokens": sum(u["completion_tokens"] for u in told),
    }
    totals = until(
        lambda: (t := _usage(url, since)) and t["requests"] >= len(ids) and t, 60, "the held rows to be stored"
    )
    assert {name: totals[name] for name in expected} == expected
    stored = _stored(database, since)
    assert sorted(request_id for request_id, _, _ in stored) == sorted([*ids[:-1], bounded(long_id, 200)])
    until(lambda: not list(spill.glob("*.jsonl")), 15, "the ingress replica's disk to hold no rows")
    until(lambda: _pending(metrics_url) == 0, 15, "llm_usage_rows_pending to fall to 0")


def test_a_5000_character_request_id_is_stored_bounded_with_its_batch(app):
    url, database, _ = app
    since = time.time()
    run = secrets.token_hex(4)
    ids = [f"batch-{run}-{index}" for index in range(3)] + [f"long-{run}-".ljust(5000, c) for c in "yz"]
    _ask_all(url, ids)  # concurrent: in one flush interval, one batch
    rows = until(lambda: len(stored := _stored(database, since)) == len(ids) and stored, 15, "the batch to be stored")
    stored_ids = sorted(request_id for request_id, _, _ in rows)
    assert stored_ids == sorted([*ids[:3], bounded(ids[3], 200), bounded(ids[4], 200)])
    assert all(len(request_id) <= 200 for request_id in stored_ids)
    assert bounded(ids[3], 200) != bounded(ids[4], 200)
