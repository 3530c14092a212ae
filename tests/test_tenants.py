"""Tenants, prices and soft budgets without a cluster: the config's rules, the registry and the
key ring (a tenant's limits reach its keys' callers; a suspended tenant suspends its keys; a tenant
with keys is not deleted), the admin routes' logic, the ledger's tenant and cost, a database an
earlier version made, and the request log's line."""

import asyncio
import logging
import sqlite3
import uuid
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from cluster.schema import AuthConfig, ClusterConfig, KeyLimits, Price, Tenant
from serve_app.apis.admin_registry import RegistryCalls
from serve_app.apis.admin_tenants import AdminTenants
from serve_app.errors import BadRequest, Conflict, NotFound, Unauthorized
from serve_app.telemetry import request_log
from serve_app.telemetry.record import FinishedRequest
from serve_app.tenancy.budgets import Subject
from serve_app.tenancy.key_registry import KeyRegistry, KeyWatch, Refusal
from serve_app.tenancy.key_store import KeySnapshot, KeyStore, StoredTenant
from serve_app.tenancy.keys import KeyRing
from serve_app.tenancy.limiter import LimitGate
from serve_app.tenancy.usage_store import UsageRow, UsageStore
from tests.test_runtime_keys import InProcessHandle, _digest, _request, _stored, _until

OPS = "ops-secret"


def _auth() -> AuthConfig:
    return AuthConfig.model_validate(
        {
            "tenants": [{"name": "house", "limits": {"concurrent_requests": 3}}],
            "keys": [
                {"name": "ops", "sha256": _digest(OPS), "scopes": ["admin"]},
                {"name": "intern", "sha256": _digest("intern"), "tenant": "house"},
            ],
        }
    )


def _config(**fields) -> dict:
    return {"models": [{"id": "m", "source": {"path": "/m"}}]} | fields


def test_a_config_keys_tenant_must_be_one_of_the_configs():
    with pytest.raises(ValidationError, match=r"auth.keys.0.tenant: 'acme' is not a tenant of auth.tenants \(none\)"):
        AuthConfig.model_validate({"keys": [{"name": "a", "sha256": "0" * 64, "tenant": "acme"}]})
    with pytest.raises(ValidationError, match="duplicate tenant name"):
        AuthConfig.model_validate({"tenants": [{"name": "t"}, {"name": "t"}]})


def test_prices_share_one_currency_and_spend_budgets_need_a_price():
    priced = {"id": "p", "source": {"path": "/p"}, "price": {"prompt_per_million": 1, "completion_per_million": 2}}
    euro = priced | {"id": "e", "price": {"prompt_per_million": 1, "completion_per_million": 2, "currency": "EUR"}}
    with pytest.raises(ValidationError, match="models' prices are in EUR, USD: use one currency"):
        ClusterConfig.model_validate({"models": [priced, euro]})
    spender = {"tenants": [{"name": "t", "limits": {"spend_per_day": 5}}]}
    with pytest.raises(ValidationError, match=r"auth.tenants 't': spend budgets need a `price`"):
        ClusterConfig.model_validate(_config(auth=spender))
    config = ClusterConfig.model_validate({"models": [priced], "auth": spender})
    assert config.currency == "USD"
    assert Price(prompt_per_million=2, completion_per_million=8).cost(500_000, 250_000) == 3.0


def test_a_config_tenants_limits_reach_its_keys_callers():
    caller = KeyRing(_auth()).authenticate("Bearer intern")
    assert caller.tenant_name == "house"
    assert [subject.id for subject in caller.subjects()] == ["key:intern", "tenant:house"]
    assert caller.subjects()[1].limits == KeyLimits(concurrent_requests=3)
    assert KeyRing(_auth()).authenticate(f"Bearer {OPS}").subjects()[0].id == "key:ops"


@pytest.fixture
async def watched(tmp_path):
    auth = _auth()
    registry = KeyRegistry(
        f"sqlite:///{tmp_path}/usage.sqlite", [key.name for key in auth.keys], [tenant.name for tenant in auth.tenants]
    )
    ring = KeyRing(auth)
    watch = KeyWatch(InProcessHandle(registry), ring)
    await watch.start()
    yield SimpleNamespace(ring=ring, watch=watch, registry=registry)
    watch.stop()
    await asyncio.sleep(0)


async def test_a_runtime_tenant_is_shared_by_its_keys_suspends_them_and_is_kept_while_they_are(watched):
    registry, ring = watched.registry, watched.ring
    await registry.create(StoredTenant("acme", {"tokens_per_day": 100}), "ops")
    await registry.create(_stored("alice", "sk-alice", tenant="acme"), "ops")
    await registry.create(_stored("bob", "sk-bob", tenant="house"), "ops")  # a config tenant
    await _until(lambda: ring.revision >= 3)
    alice = ring.authenticate("Bearer sk-alice")
    assert alice.tenant == Tenant(name="acme", limits=KeyLimits(tokens_per_day=100))
    assert ring.authenticate("Bearer sk-bob").tenant_name == "house"

    await registry.update("tenant", "acme", {"limits": {"tokens_per_day": 200}}, "ops")
    await _until(lambda: ring.revision >= 4)
    assert ring.authenticate("Bearer sk-alice").tenant.limits.tokens_per_day == 200

    await registry.update("tenant", "acme", {"disabled": True}, "ops")
    await _until(lambda: ring.revision >= 5)
    with pytest.raises(Unauthorized, match="API key 'alice' is suspended, as its tenant 'acme' is"):
        ring.authenticate("Bearer sk-alice")
    await registry.update("tenant", "acme", {"disabled": False}, "ops")
    await _until(lambda: ring.revision >= 6)
    assert ring.authenticate("Bearer sk-alice").tenant_name == "acme"

    in_use = await registry.delete("tenant", "acme", "ops")
    assert in_use == Refusal(409, "tenant 'acme' still has API keys (alice): delete or move them first")
    await registry.update("key", "alice", {"tenant": None}, "ops")
    assert isinstance(await registry.delete("tenant", "acme", "ops"), KeySnapshot)
    audit = [(row["action"], row["target"]) for row in await registry.audit(10)]
    assert audit[0] == ("tenant.delete", "acme") and ("tenant.create", "acme") in audit


async def test_the_registry_refuses_unknown_and_config_tenants(watched):
    registry = watched.registry
    unknown = await registry.create(_stored("carol", "sk-carol", tenant="ghost"), "ops")
    assert unknown.status == 400 and "no tenant named 'ghost'" in unknown.message
    await registry.create(_stored("carol", "sk-carol"), "ops")
    assert (await registry.update("key", "carol", {"tenant": "ghost"}, "ops")).status == 400
    assert (await registry.create(StoredTenant("house", {}), "ops")).status == 409
    assert (await registry.update("tenant", "house", {"disabled": True}, "ops")).status == 409
    assert (await registry.delete("tenant", "nobody", "ops")).status == 404
    await registry.create(StoredTenant("acme", {}), "ops")
    assert (await registry.create(StoredTenant("acme", {}), "ops")).status == 409


async def test_the_tenant_routes_make_list_show_change_and_delete(watched):
    admin = AdminTenants(RegistryCalls(watched.watch, "USD"), _auth().tenants, _auth().keys, LimitGate(None))
    ops = watched.ring.authenticate(f"Bearer {OPS}")
    unpriced = AdminTenants(RegistryCalls(watched.watch), _auth().tenants, _auth().keys, LimitGate(None))
    with pytest.raises(BadRequest, match="spend budgets need a `price`"):
        await unpriced.create(_request({"name": "free", "limits": {"spend_per_day": 1}}), ops)
    made = await admin.create(
        _request({"name": "acme", "limits": {"spend_per_month": 5}, "metadata": {"plan": "pro"}}), ops
    )
    assert made.status_code == 201
    await watched.registry.create(_stored("alice", "sk-alice", tenant="acme"), "ops")
    listed = {tenant["name"]: tenant for tenant in (await admin.all())["data"]}
    assert listed["house"]["source"] == "config" and listed["house"]["keys"] == ["intern"]
    assert listed["acme"]["source"] == "api" and listed["acme"]["keys"] == ["alice"]
    assert listed["acme"]["limits"]["spend_per_month"] == 5 and listed["acme"]["metadata"] == {"plan": "pro"}
    assert (await admin.show("acme"))["budget_used"] == {}  # no limiter in this config (the e2e test has one)
    changed = await admin.update(_request({"limits": {"tokens_per_day": 7}}, "PATCH"), ops, "acme")
    assert changed["limits"]["tokens_per_day"] == 7 and changed["limits"]["spend_per_month"] is None
    with pytest.raises(BadRequest, match="disabled: may not be null"):
        await admin.update(_request({"disabled": None}, "PATCH"), ops, "acme")
    with pytest.raises(BadRequest, match="name"):
        await admin.create(_request({"name": "has space"}), ops)
    with pytest.raises(Conflict, match="still has API keys"):
        await admin.delete(ops, "acme")
    with pytest.raises(NotFound):
        await admin.show("nobody")
    without = AdminTenants(RegistryCalls(None), [], [], LimitGate(None))
    with pytest.raises(NotFound, match="cannot be made at runtime"):
        await without.all()


def _usage_row(tenant: str | None, cost: float | None, tokens: int = 5) -> UsageRow:
    return UsageRow(uuid.uuid4().hex, "r", 100.0, "k", "m", "/llm", tokens, tokens, "stop", 200, 1.0, tenant, cost)


def test_the_ledger_totals_by_tenant_with_their_cost(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path}/usage.sqlite")
    store.add([_usage_row("acme", 0.25), _usage_row("acme", 0.5), _usage_row(None, None), _usage_row("beta", None)])
    by_tenant = {row["tenant"]: (row["requests"], row["cost"]) for row in store.totals(None, None, group_by=["tenant"])}
    assert by_tenant == {None: (1, None), "acme": (2, 0.75), "beta": (1, None)}
    assert store.totals(None, None, group_by=[], tenant="acme")[0]["total_tokens"] == 20


def test_rows_spilled_by_an_earlier_version_read_without_tenant_and_cost():
    row = _usage_row("acme", 1.0).to_json()
    old = {name: value for name, value in row.items() if name not in ("tenant", "cost")}
    assert UsageRow.from_json(old).tenant is None and UsageRow.from_json(old).cost is None
    with pytest.raises(KeyError):
        UsageRow.from_json({name: value for name, value in old.items() if name != "model"})


def test_a_database_an_earlier_version_made_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "usage.sqlite"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE usage (id VARCHAR(32) PRIMARY KEY, request_id VARCHAR(200) NOT NULL, time FLOAT NOT NULL,"
            " key VARCHAR(200), model VARCHAR(200) NOT NULL, endpoint VARCHAR(50) NOT NULL, prompt_tokens INTEGER"
            " NOT NULL, completion_tokens INTEGER NOT NULL, finish_reason VARCHAR(50), status INTEGER NOT NULL,"
            " latency_ms FLOAT NOT NULL)"
        )
        old.execute("INSERT INTO usage VALUES ('1', 'r', 5.0, 'k', 'm', '/llm', 2, 3, 'stop', 200, 1.0)")
        old.execute(
            "CREATE TABLE api_keys (name VARCHAR(100) PRIMARY KEY, digest VARCHAR(64) NOT NULL UNIQUE,"
            " previous_digest VARCHAR(64), previous_valid_until FLOAT, models JSON NOT NULL, scopes JSON NOT NULL,"
            " limits JSON NOT NULL, expires_at FLOAT, disabled BOOLEAN NOT NULL, metadata JSON NOT NULL,"
            " created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL)"
        )
        old.execute(
            "INSERT INTO api_keys VALUES ('alice', ?, NULL, NULL, '[\"*\"]', '[\"chat\"]', '{}', NULL, 0, '{}', 1, 1)",
            (_digest("sk-alice"),),
        )
    store = UsageStore(f"sqlite:///{path}")
    store.add([_usage_row("acme", 0.5)])
    assert [(row["tenant"], row["total_tokens"]) for row in store.totals(None, None, group_by=["tenant"])] == [
        (None, 5),
        ("acme", 10),
    ]
    [alice] = KeyStore(f"sqlite:///{path}").snapshot().keys
    assert (alice.name, alice.tenant) == ("alice", None)


def test_the_request_log_line_names_the_tenant_the_cost_and_the_soft_budgets_passed(caplog):
    finished = FinishedRequest(
        request_id="r1",
        endpoint="/llm",
        key_name="alice",
        model="m",
        status=200,
        prompt_tokens=3,
        completion_tokens=4,
        finish_reason="stop",
        started_at=0.0,
        duration_s=0.5,
        ttft_s=0.1,
        mean_token_gap_s=None,
        reached_engine=True,
        tenant="acme",
        cost=0.00125,
        soft_budgets=("tenant:acme soft tokens_per_day",),
    )
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        request_log.write(finished)
    [record] = caplog.records
    assert record.getMessage().endswith(" tenant=acme cost=0.00125 soft_budgets=tenant:acme/soft/tokens_per_day")
    assert record.llm_request["tenant"] == "acme" and record.llm_request["soft_budgets"] == [
        "tenant:acme soft tokens_per_day"
    ]
    plain = FinishedRequest(**(finished.__dict__ | {"tenant": None, "cost": None, "soft_budgets": ()}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        request_log.write(plain)
    assert caplog.records[0].getMessage().endswith("total=500.0ms")


def test_a_tenant_subject_is_apart_from_a_key_of_the_same_name():
    assert Subject.tenant("a", KeyLimits()).id != Subject.key("a", KeyLimits()).id


def test_a_column_another_process_added_first_is_no_error(tmp_path):
    """The ledger and the limiter migrate the same database as the application starts."""
    import sqlalchemy as sa

    from serve_app.tenancy import usage_store
    from serve_app.tenancy.database import _add_column, engine_for

    url = f"sqlite:///{tmp_path}/usage.sqlite"
    UsageStore(url)
    engine = engine_for(url)
    _add_column(engine, usage_store._usage, usage_store._usage.c.tenant)  # already there: nothing to do
    bogus = sa.Column("tenant", sa.Integer)
    with pytest.raises(sa.exc.NoSuchTableError):  # a failure that leaves the column missing is raised
        _add_column(engine, sa.Table("missing", sa.MetaData(), bogus), bogus)
