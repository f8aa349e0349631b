"""``self.idempotency.transaction`` through a SQLAlchemy ``Engine``.

Used when ``idempotency_database`` is an ``Engine`` (a ``Connection`` or a ``Session``
is refused: celery_idem opens its own transactions). ``fn`` receives the
``sqlalchemy.engine.Connection`` of the transaction; bind a ``Session`` to it,
``Session(bind=conn)``, to use the ORM in the same transaction (the session joins
it: its ``commit()`` leaves the commit to celery_idem). Do not call
``conn.commit()`` in ``fn``: SQLAlchemy commits fn's writes there, without the
step's row (psycopg and Django refuse a commit inside their transaction blocks),
and the step then fails with ``InvalidRequestError``. An Engine in autocommit mode
is refused before ``fn`` runs. The step table is created on first use.

A transaction opened while the thread already has one open on the same engine (a
``self.idempotency.transaction`` inside an ``idempotency_transaction=True`` body) is a
savepoint of it, as with psycopg and Django, not a second connection's transaction
that would commit on its own. Each pool process of a worker gives the Engine a new
pool (``dispose(close=False)``), so connections the main process left in it are
never shared between processes.

Tested on PostgreSQL (psycopg); SQLite works for a transaction (the step table's
SQL is portable), with SQLite's own limits on concurrent writers; savepoints on
SQLite need SQLAlchemy's pysqlite recipe, and are not tested.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy
import sqlalchemy.exc

from ..effects import SCHEMA
from ..errors import ImproperlyConfigured

__all__ = ["SQLAlchemyDatabase", "forget_inherited_connections"]

_SCHEMA_LOCK = 0x63656C6964656D


def forget_inherited_connections(engine: sqlalchemy.engine.Engine) -> None:
    """Give ``engine`` a new, empty pool in a forked process, leaving the parent's connections alone.

    SQLAlchemy's advice for pools across ``fork()``: ``dispose(close=False)`` drops
    the inherited connections without closing them (closing would end the parent's
    sessions too).
    """
    engine.dispose(close=False)


class _Transaction:
    """An open transaction on a SQLAlchemy connection."""

    def __init__(self, connection: sqlalchemy.engine.Connection, paramstyle: str) -> None:
        self.argument = connection
        self._connection = connection
        self._qmark = paramstyle == "qmark"

    def _sql(self, sql: str) -> str:
        return sql.replace("%s", "?") if self._qmark else sql

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` and return its rows."""
        return [tuple(row) for row in self._connection.exec_driver_sql(self._sql(sql), tuple(params))]

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run ``sql`` and return how many rows it changed."""
        return int(self._connection.exec_driver_sql(self._sql(sql), tuple(params)).rowcount)


class SQLAlchemyDatabase:
    """The database of a SQLAlchemy ``Engine`` (its pool serves every thread)."""

    unavailable: tuple[type[BaseException], ...] = (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
    )
    conflict: tuple[type[BaseException], ...] = (sqlalchemy.exc.IntegrityError,)

    def __init__(self, engine: sqlalchemy.engine.Engine) -> None:
        self._engine = engine
        self.where = engine.url.render_as_string(hide_password=True)
        self._paramstyle = str(engine.dialect.paramstyle)
        self._schema_ready = False
        self._local = threading.local()

    def _create_schema(self) -> None:
        with self._engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    connection.exec_driver_sql(statement)
        self._schema_ready = True

    @contextmanager
    def atomic(self) -> Iterator[_Transaction]:
        """A transaction on a connection of the engine's pool, or a savepoint of the open one."""
        current: sqlalchemy.engine.Connection | None = getattr(self._local, "connection", None)
        if current is not None:
            with current.begin_nested():
                yield _Transaction(current, self._paramstyle)
            return
        if not self._schema_ready:
            self._create_schema()
        with self._engine.begin() as connection:
            if getattr(connection.connection.dbapi_connection, "autocommit", False) is True:
                raise ImproperlyConfigured(
                    f"the connections of {self.where} are in autocommit mode (isolation_level="
                    "'AUTOCOMMIT'), so fn's writes and the step's row would each commit on their own: "
                    "give idempotency_database an Engine without it"
                )
            self._local.connection = connection
            try:
                yield _Transaction(connection, self._paramstyle)
            finally:
                self._local.connection = None

    def run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one statement in a transaction of its own."""
        with self.atomic() as tx:
            result = tx.argument.exec_driver_sql(tx._sql(sql), tuple(params))
            return [tuple(row) for row in result] if result.returns_rows else []
