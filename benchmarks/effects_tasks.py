"""The tasks of the effects benchmark: one ledger insert each, three ways.

Every SQL statement the worker sends to PostgreSQL goes through a cursor that
counts it (:func:`benchmarks.counting.count_statement`); ``BEGIN`` and ``COMMIT``
are counted from the transactions opened.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from .counting import count_statement
from .probe import probe

__all__ = ["connection", "insert", "register"]

_connections: dict[int, Any] = {}


def _cursor_class() -> Any:
    import psycopg

    class CountingCursor(psycopg.Cursor):  # type: ignore[type-arg,misc]
        """A psycopg cursor that counts the statements it executes."""

        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            count_statement("sql")
            return super().execute(query, params, **kwargs)

    return CountingCursor


def connection(url: str) -> Any:
    """This process's own connection, for the tasks that write directly."""
    import psycopg

    pid = os.getpid()
    if pid not in _connections:
        _connections[pid] = psycopg.connect(url, autocommit=True, cursor_factory=_cursor_class())
    return _connections[pid]


def insert(conn: Any, i: int) -> int:
    """The effect: one ledger row."""
    row = conn.execute("INSERT INTO ledger (n) VALUES (%s) RETURNING id", (i,)).fetchone()
    return int(row[0])


def register(app: Celery, idempotent: bool) -> None:
    """Define the effects benchmark's tasks on ``app`` (the idempotent ones import celery_idem)."""
    url = app.conf.idempotency_database_url
    # celery_idem's own connections count their statements too.
    app.conf.idempotency_database_options = {"cursor_factory": _cursor_class()}

    @app.task(shared=False, name="bench.effects.plain", acks_late=True, reject_on_worker_lost=True)
    def plain(i: int) -> None:
        probe.body_start()
        insert(connection(url), i)
        probe.body_end()

    @app.task(shared=False, name="bench.effects.plain_tx", acks_late=True, reject_on_worker_lost=True)
    def plain_tx(i: int) -> None:
        probe.body_start()
        conn = connection(url)
        with conn.transaction():
            count_statement("begin/commit")
            insert(conn, i)
            count_statement("begin/commit")
        probe.body_end()

    if not idempotent:
        return
    from celery_idem import IdempotentTask

    @app.task(base=IdempotentTask, shared=False, name="bench.effects.outside")
    def outside(i: int) -> None:
        probe.body_start()
        insert(connection(url), i)
        probe.body_end()

    @app.task(base=IdempotentTask, bind=True, shared=False, name="bench.effects.transaction")
    def transaction(self: Any, i: int) -> None:
        probe.body_start()
        self.idempotency.transaction(insert, i)
        count_statement("begin/commit")  # the transaction's BEGIN and COMMIT
        count_statement("begin/commit")
        probe.body_end()

    @app.task(base=IdempotentTask, bind=True, shared=False, name="bench.effects.step")
    def step(self: Any, i: int) -> None:
        probe.body_start()
        self.idempotency.step(abs, i)
        probe.body_end()
