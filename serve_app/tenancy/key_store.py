"""API keys made at runtime, in the tenancy database beside the usage ledger: the keys, a revision
that every change advances, and an audit row per change, all written in one transaction.

Secrets are never stored, only their sha256 digests; the audit never holds a digest either. The
store is plain, synchronous SQLAlchemy Core: its one writer is the key registry's replica.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from serve_app.tenancy.database import engine_for

_metadata = sa.MetaData()
_keys = sa.Table(
    "api_keys",
    _metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("previous_digest", sa.String(64)),
    sa.Column("previous_valid_until", sa.Float),
    sa.Column("models", sa.JSON, nullable=False),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("limits", sa.JSON, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("disabled", sa.Boolean, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
_revision = sa.Table(
    "api_key_revision",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
)
_audit = sa.Table(
    "audit",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Float, nullable=False, index=True),
    sa.Column("actor", sa.String(100)),
    sa.Column("action", sa.String(50), nullable=False),
    sa.Column("target", sa.String(100), nullable=False),
    sa.Column("before", sa.JSON),
    sa.Column("after", sa.JSON),
)

SECRET_FIELDS = ("digest", "previous_digest")


@dataclass(frozen=True)
class StoredKey:
    name: str
    digest: str
    models: list[str]
    scopes: list[str]
    limits: dict[str, int | None]
    expires_at: float | None = None
    disabled: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    previous_digest: str | None = None
    """A rotated key's old secret, valid until `previous_valid_until`."""
    previous_valid_until: float | None = None

    def public(self) -> dict[str, Any]:
        """What the audit and the admin API may show: everything but the digests."""
        return {name: value for name, value in asdict(self).items() if name not in SECRET_FIELDS}


@dataclass(frozen=True)
class KeySnapshot:
    """Every stored key as of one revision: what each ingress replica holds."""

    revision: int
    keys: list[StoredKey]


class KeyExists(Exception):
    pass


class NoSuchKey(LookupError):
    pass


class KeyStore:
    def __init__(self, url: str) -> None:
        self._engine = engine_for(url)
        _metadata.create_all(self._engine)
        with self._engine.begin() as connection:
            if connection.execute(sa.select(_revision.c.revision)).first() is None:
                connection.execute(_revision.insert().values(id=1, revision=0))

    def snapshot(self) -> KeySnapshot:
        with self._engine.connect() as connection:
            revision = connection.execute(sa.select(_revision.c.revision)).scalar_one()
            keys = [StoredKey(**row._mapping) for row in connection.execute(sa.select(_keys).order_by(_keys.c.name))]
        return KeySnapshot(revision, keys)

    def create(self, key: StoredKey, actor: str | None) -> StoredKey:
        now = time.time()
        key = replace(key, created_at=now, updated_at=now)
        with self._engine.begin() as connection:
            if connection.execute(sa.select(_keys.c.name).where(_keys.c.name == key.name)).first() is not None:
                raise KeyExists(key.name)
            connection.execute(_keys.insert().values(**asdict(key)))
            self._changed(connection, actor, "create", key.name, None, key)
        return key

    def update(self, name: str, changes: dict[str, Any], actor: str | None, action: str = "update") -> StoredKey:
        """`changes` names StoredKey fields; a rotation is an update of the digests."""
        with self._engine.begin() as connection:
            before = self._get(connection, name)
            after = replace(before, **changes, updated_at=time.time())
            connection.execute(_keys.update().where(_keys.c.name == name).values(**asdict(after)))
            self._changed(connection, actor, action, name, before, after)
        return after

    def delete(self, name: str, actor: str | None) -> StoredKey:
        with self._engine.begin() as connection:
            before = self._get(connection, name)
            connection.execute(_keys.delete().where(_keys.c.name == name))
            self._changed(connection, actor, "delete", name, before, None)
        return before

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(_audit).order_by(_audit.c.id.desc()).limit(limit)
        with self._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    @staticmethod
    def _get(connection: sa.Connection, name: str) -> StoredKey:
        row = connection.execute(sa.select(_keys).where(_keys.c.name == name)).first()
        if row is None:
            raise NoSuchKey(name)
        return StoredKey(**row._mapping)

    @staticmethod
    def _changed(
        connection: sa.Connection,
        actor: str | None,
        action: str,
        target: str,
        before: StoredKey | None,
        after: StoredKey | None,
    ) -> None:
        connection.execute(_revision.update().values(revision=_revision.c.revision + 1))
        connection.execute(
            _audit.insert().values(
                time=time.time(),
                actor=actor,
                action=action,
                target=target,
                before=None if before is None else before.public(),
                after=None if after is None else after.public(),
            )
        )
