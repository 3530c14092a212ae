"""API keys and tenants made at runtime, in the tenancy database beside the usage ledger: the keys,
the tenants, a revision that every change advances, and an audit row per change, all written in
one transaction.

Secrets are never stored, only their sha256 digests; the audit never holds a digest either. The
store is plain, synchronous SQLAlchemy Core: its one writer is the key registry's replica.
"""

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from serve_app.tenancy.database import create_tables, engine_for

_metadata = sa.MetaData()
_keys = sa.Table(
    "api_keys",
    _metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("tenant", sa.String(100)),
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
_tenants = sa.Table(
    "tenants",
    _metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("limits", sa.JSON, nullable=False),
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
    tenant: str | None = None

    def public(self) -> dict[str, Any]:
        """What the audit and the admin API may show: everything but the digests."""
        return {name: value for name, value in asdict(self).items() if name not in SECRET_FIELDS}


@dataclass(frozen=True)
class StoredTenant:
    name: str
    limits: dict[str, Any]
    disabled: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)


Stored = StoredKey | StoredTenant


@dataclass(frozen=True)
class KeySnapshot:
    """Every stored key and tenant as of one revision: what each ingress replica holds."""

    revision: int
    keys: list[StoredKey]
    tenants: list[StoredTenant] = field(default_factory=list)


class KeyExists(Exception):
    pass


class NoSuchKey(LookupError):
    pass


class TenantInUse(Exception):
    """A tenant that keys still belong to cannot be deleted."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


_KINDS: dict[str, tuple[sa.Table, type]] = {"key": (_keys, StoredKey), "tenant": (_tenants, StoredTenant)}
"""Each record kind's table and row type; its audit actions are `<kind>.<action>`."""


class KeyStore:
    def __init__(self, url: str) -> None:
        self._engine = engine_for(url)
        create_tables(self._engine, _metadata)
        with self._engine.begin() as connection:
            if connection.execute(sa.select(_revision.c.revision)).first() is None:
                connection.execute(_revision.insert().values(id=1, revision=0))

    def snapshot(self) -> KeySnapshot:
        with self._engine.connect() as connection:
            revision = connection.execute(sa.select(_revision.c.revision)).scalar_one()
            keys = [StoredKey(**row._mapping) for row in connection.execute(sa.select(_keys).order_by(_keys.c.name))]
            query = sa.select(_tenants).order_by(_tenants.c.name)
            tenants = [StoredTenant(**row._mapping) for row in connection.execute(query)]
        return KeySnapshot(revision, keys, tenants)

    def create(self, record: Stored, actor: str | None) -> Stored:
        kind = _kind_of(record)
        table, _ = _KINDS[kind]
        now = time.time()
        record = replace(record, created_at=now, updated_at=now)
        with self._engine.begin() as connection:
            if connection.execute(sa.select(table.c.name).where(table.c.name == record.name)).first() is not None:
                raise KeyExists(record.name)
            connection.execute(table.insert().values(**asdict(record)))
            self._changed(connection, actor, f"{kind}.create", record.name, None, record)
        return record

    def update(
        self, kind: str, name: str, changes: dict[str, Any], actor: str | None, action: str = "update"
    ) -> Stored:
        """`changes` names the record's fields; a key's rotation is an update of its digests."""
        table, _ = _KINDS[kind]
        with self._engine.begin() as connection:
            before = self._get(connection, kind, name)
            after = replace(before, **changes, updated_at=time.time())
            connection.execute(table.update().where(table.c.name == name).values(**asdict(after)))
            self._changed(connection, actor, f"{kind}.{action}", name, before, after)
        return after

    def delete(self, kind: str, name: str, actor: str | None) -> Stored:
        table, _ = _KINDS[kind]
        with self._engine.begin() as connection:
            before = self._get(connection, kind, name)
            if kind == "tenant":
                members = connection.execute(sa.select(_keys.c.name).where(_keys.c.tenant == name)).scalars().all()
                if members:
                    raise TenantInUse(sorted(members))
            connection.execute(table.delete().where(table.c.name == name))
            self._changed(connection, actor, f"{kind}.delete", name, before, None)
        return before

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(_audit).order_by(_audit.c.id.desc()).limit(limit)
        with self._engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(query)]

    @staticmethod
    def _get(connection: sa.Connection, kind: str, name: str) -> Stored:
        table, row_type = _KINDS[kind]
        row = connection.execute(sa.select(table).where(table.c.name == name)).first()
        if row is None:
            raise NoSuchKey(name)
        return row_type(**row._mapping)

    @staticmethod
    def _changed(
        connection: sa.Connection,
        actor: str | None,
        action: str,
        target: str,
        before: Stored | None,
        after: Stored | None,
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


def _kind_of(record: Stored) -> str:
    return "key" if isinstance(record, StoredKey) else "tenant"
