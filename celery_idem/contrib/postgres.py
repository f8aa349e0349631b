"""``self.idempotency.transaction`` on PostgreSQL through psycopg 3.

Used when ``idempotency_database_url`` is a ``postgresql://`` URL (install the
``celery-idem[postgres]`` extra); ``idempotency_database_options`` are keyword
arguments of ``psycopg.connect``. Each thread of a worker process keeps one
connection, in autocommit mode outside the transactions it runs; a connection that
failed is closed and a new one made for the next transaction. The step table is
created on first use (``CREATE TABLE IF NOT EXISTS``, under an advisory lock, so
workers starting together do not race); create it yourself from
``celery_idem.effects.SCHEMA`` if the workers' role may not.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors

from ..effects import SCHEMA

__all__ = ["PostgresDatabase"]

#: Key of the advisory lock held while the step table is created.
_SCHEMA_LOCK = 0x63656C6964656D  # "celidem"


class _Transaction:
    """An open transaction on a psycopg connection."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.argument = connection
        self._connection = connection

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` and return its rows."""
        return [tuple(row) for row in self._connection.execute(sql, params).fetchall()]

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run ``sql`` and return how many rows it changed."""
        return self._connection.execute(sql, params).rowcount


class PostgresDatabase:
    """PostgreSQL at ``url``, through psycopg 3; one connection per thread."""

    unavailable: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError)
    conflict: tuple[type[BaseException], ...] = (psycopg.errors.UniqueViolation,)

    def __init__(self, url: str, options: Mapping[str, Any]) -> None:
        from ..connections import redact

        self._url = url
        self._options = dict(options)
        self.where = redact(url)
        self._local = threading.local()
        self._schema_ready = False

    def _connection(self) -> psycopg.Connection[Any]:
        connection: psycopg.Connection[Any] | None = getattr(self._local, "connection", None)
        if connection is None or connection.closed or connection.broken:
            connection = psycopg.connect(self._url, autocommit=True, **self._options)
            self._local.connection = connection
            if not self._schema_ready:
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            connection.execute(statement)
                self._schema_ready = True
        return connection

    @contextmanager
    def atomic(self) -> Iterator[_Transaction]:
        """A transaction on this thread's connection."""
        connection = self._connection()
        try:
            with connection.transaction():
                yield _Transaction(connection)
        except self.unavailable:
            connection.close()
            raise

    def run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one statement in a transaction of its own."""
        with self.atomic() as tx:
            cursor = tx.argument.execute(sql, params)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
