"""The runtime key store on a real SQLite file: each change advances the revision by one, in the
transaction that writes its audit row (which never holds a digest); a second store on the file
reads what the first wrote, as a restarted registry does."""

import hashlib
import json

import pytest
import sqlalchemy as sa

from serve_app.tenancy.key_store import SECRET_FIELDS, KeyExists, KeyStore, NoSuchKey, StoredKey


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(name: str = "alice", secret: str = "sk-alice", **fields) -> StoredKey:
    values = {
        "models": ["m1"],
        "scopes": ["chat"],
        "limits": {"requests_per_minute": 5, "tokens_per_minute": None, "concurrent_requests": None},
        "metadata": {"team": "a"},
    }
    return StoredKey(name=name, digest=_digest(secret), **(values | fields))


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/state/keys.sqlite"


def _no_digest_in(rows: list[dict], *digests: str) -> None:
    for row in rows:
        text = json.dumps(row, default=str)
        for digest in digests:
            assert digest not in text and digest.upper() not in text
        for side in (row["before"], row["after"]):
            assert side is None or not set(SECRET_FIELDS) & set(side)


def test_an_empty_store_is_at_revision_zero(url):
    snapshot = KeyStore(url).snapshot()
    assert (snapshot.revision, snapshot.keys) == (0, [])
    assert KeyStore(url).audit() == []


def test_each_change_advances_the_revision_by_one_with_its_audit_row(url):
    store = KeyStore(url)
    created = store.create(_key(), actor="ops")
    assert created.created_at > 0 and created.created_at == created.updated_at
    snapshot = store.snapshot()
    assert snapshot.revision == 1 and snapshot.keys == [created]

    [row] = store.audit()
    assert (row["actor"], row["action"], row["target"], row["before"]) == ("ops", "key.create", "alice", None)
    assert row["after"] == created.public() and row["after"]["models"] == ["m1"] and row["time"] > 0

    updated = store.update("key", "alice", {"disabled": True, "models": ["m2"]}, actor="ops")
    assert updated.disabled and updated.models == ["m2"] and updated.metadata == {"team": "a"}
    assert updated.created_at == created.created_at and updated.updated_at >= created.updated_at
    assert store.snapshot().revision == 2 and store.snapshot().keys == [updated]
    row = store.audit()[0]
    assert (row["action"], row["target"]) == ("key.update", "alice")
    assert row["before"] == created.public() and row["after"] == updated.public()

    deleted = store.delete("key", "alice", actor="root")
    assert deleted == updated
    snapshot = store.snapshot()
    assert (snapshot.revision, snapshot.keys) == (3, [])
    row = store.audit()[0]
    assert (row["actor"], row["action"], row["target"]) == ("root", "key.delete", "alice")
    assert row["before"] == updated.public() and row["after"] is None

    assert [row["action"] for row in store.audit()] == ["key.delete", "key.update", "key.create"]  # newest first
    assert [row["action"] for row in store.audit(limit=1)] == ["key.delete"]


def test_the_audit_never_holds_a_digest_not_even_a_rotated_ones(url):
    store = KeyStore(url)
    store.create(_key(secret="first"), actor="ops")
    rotated = {"digest": _digest("second"), "previous_digest": _digest("first"), "previous_valid_until": 2e9}
    after = store.update("key", "alice", rotated, actor="ops", action="rotate")
    assert (after.digest, after.previous_digest, after.previous_valid_until) == (
        _digest("second"),
        _digest("first"),
        2e9,
    )
    store.delete("key", "alice", actor=None)
    rows = store.audit()
    assert [row["action"] for row in rows] == ["key.delete", "key.rotate", "key.create"]
    assert rows[1]["after"]["previous_valid_until"] == 2e9
    assert rows[0]["actor"] is None
    _no_digest_in(rows, _digest("first"), _digest("second"))
    assert "digest" not in after.public() and "previous_digest" not in after.public()


def test_a_change_whose_audit_row_fails_changes_nothing(url):
    """The key, the revision and the audit row are one transaction: no revision without its row."""
    store = KeyStore(url)
    store.create(_key("bob", "sk-bob"), actor="ops")
    before = store.snapshot()

    def refuse_the_audit(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO AUDIT"):
            raise RuntimeError("the audit table is unwritable")

    sa.event.listen(store._engine, "before_cursor_execute", refuse_the_audit)
    with pytest.raises(Exception, match="unwritable"):
        store.create(_key(), actor="ops")
    with pytest.raises(Exception, match="unwritable"):
        store.update("key", "bob", {"disabled": True}, actor="ops")
    with pytest.raises(Exception, match="unwritable"):
        store.delete("key", "bob", actor="ops")
    sa.event.remove(store._engine, "before_cursor_execute", refuse_the_audit)

    for reader in (store, KeyStore(url)):
        assert reader.snapshot() == before
        assert [row["action"] for row in reader.audit()] == ["key.create"]


def test_a_second_store_on_the_file_reads_the_same_snapshot_and_continues_its_revision(url):
    first = KeyStore(url)
    first.create(_key("alice", "sk-alice"), actor="ops")
    first.create(_key("bob", "sk-bob", expires_at=2e9, scopes=["chat", "admin"], models=["*"]), actor="ops")
    first.update("key", "alice", {"previous_digest": _digest("old"), "previous_valid_until": 1.5e9}, actor="ops")

    restarted = KeyStore(url)  # the registry's replica restarted: create_all and the revision row are kept
    assert restarted.snapshot() == first.snapshot()
    assert restarted.snapshot().revision == 3
    assert [key.name for key in restarted.snapshot().keys] == ["alice", "bob"]
    assert restarted.audit() == first.audit()

    restarted.delete("key", "bob", actor="ops")
    assert first.snapshot() == restarted.snapshot()
    assert first.snapshot().revision == 4


def test_create_of_an_existing_name_raises_key_exists_and_changes_nothing(url):
    store = KeyStore(url)
    store.create(_key(), actor="ops")
    before = store.snapshot()
    with pytest.raises(KeyExists):
        store.create(_key(secret="another secret"), actor="ops")
    assert store.snapshot() == before
    assert len(store.audit()) == 1


def test_update_or_delete_of_a_missing_key_raises_no_such_key_and_changes_nothing(url):
    store = KeyStore(url)
    store.create(_key(), actor="ops")
    before = store.snapshot()
    with pytest.raises(NoSuchKey):
        store.update("key", "nobody", {"disabled": True}, actor="ops")
    with pytest.raises(NoSuchKey):
        store.delete("key", "nobody", actor="ops")
    assert store.snapshot() == before
    assert len(store.audit()) == 1
