"""The tenancy database, shared by the usage ledger and the key store: one SQLAlchemy URL, SQLite
on the head node by default (WAL journal) or any Postgres, with no other change."""

from pathlib import Path
from typing import Any

import sqlalchemy as sa

HEAD_NODE = "node:__internal_head__"


def engine_for(url: str) -> sa.Engine:
    engine = sa.create_engine(_local_path(url))
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def create_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """Creates what is missing: tables, and (for a database an earlier version made) the nullable
    columns added since, which `create_all` alone leaves out of a table that exists."""
    metadata.create_all(engine)
    inspector = sa.inspect(engine)
    for table in metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                _add_column(engine, table, column)


def _add_column(engine: sa.Engine, table: sa.Table, column: sa.Column) -> None:
    """The ledger and the limiter open the same database as the application starts: the one that
    adds a column second finds it there, which is what it wanted."""
    quote = engine.dialect.identifier_preparer.quote
    kind = column.type.compile(dialect=engine.dialect)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}"))
    except sa.exc.DBAPIError:
        if column.name not in {found["name"] for found in sa.inspect(engine).get_columns(table.name)}:
            raise


def single_writer_actor_options(url: str) -> dict[str, Any]:
    """A store's one replica: no CPU of its own, and on the head node when the database is a
    SQLite file there, which must stay where it is whichever node the replica restarts on."""
    actor: dict[str, Any] = {"num_cpus": 0}
    if sa.make_url(url).get_backend_name() == "sqlite":
        actor["resources"] = {HEAD_NODE: 0.001}
    return actor


def _local_path(url: str) -> str:
    """`~` in a SQLite path means the home folder of the node the store runs on."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return url
    path = Path(parsed.database).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return parsed.set(database=str(path)).render_as_string(hide_password=False)


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets readers read while rows are written; NORMAL sync keeps every committed row through
    a process crash, which is the failure a restarted replica is; two writers (the ledger and the
    key store) wait for each other's commits instead of failing."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
