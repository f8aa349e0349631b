"""``self.idempotency.transaction`` through Django's ORM.

Add ``"celery_idem.contrib.django"`` to ``INSTALLED_APPS`` and run ``migrate`` (the
app's migration creates the step table; it is never created at run time, unlike
with psycopg and SQLAlchemy), then set ``CELERY_IDEMPOTENCY_DATABASE = "django"`` (or
``"django:<alias>"`` for another database alias). ``fn(*args, **kwargs)`` gets no
connection: it runs inside ``transaction.atomic(using=alias)``, with the step's row
written in the same transaction; use the ORM as usual inside it. Called inside an
atomic block of the same alias (the body's own, or the whole-body transaction of
``idempotency_transaction=True``, where ``self.idempotency.connection`` is None), it
is a savepoint of it: the step's row commits with that block. ``python manage.py
celery_idem_purge_steps [--database ALIAS]`` deletes expired step rows (workers
also do it every ten minutes). Connections are Django's: Celery's Django fixup
closes the ones a pool process inherits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["DjangoDatabase"]


class _Transaction:
    """An open ``transaction.atomic`` block on one database alias."""

    def __init__(self, alias: str) -> None:
        from ...effects import NO_ARGUMENT

        self.argument = NO_ARGUMENT
        self._alias = alias

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` on the alias's connection and return its rows."""
        from django.db import connections

        with connections[self._alias].cursor() as cursor:
            cursor.execute(sql, list(params))
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run ``sql`` and return how many rows it changed."""
        from django.db import connections

        with connections[self._alias].cursor() as cursor:
            cursor.execute(sql, list(params))
            return int(cursor.rowcount)


class DjangoDatabase:
    """A database alias of the Django project; its table comes from the app's migration."""

    def __init__(self, alias: str) -> None:
        from django.db import IntegrityError, InterfaceError, OperationalError

        self.where = f"Django database {alias!r}"
        self._alias = alias
        self.unavailable: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)
        self.conflict: tuple[type[BaseException], ...] = (IntegrityError,)

    @contextmanager
    def atomic(self) -> Iterator[_Transaction]:
        """``transaction.atomic(using=alias)``, closing a connection that failed.

        Inside an atomic block already open on the alias (the body's own, or the
        whole-body transaction) it is a savepoint of that block, so the step's row
        commits or rolls back with it.
        """
        from django.db import connections, transaction

        connection = connections[self._alias]
        if connection.errors_occurred and not connection.in_atomic_block:
            # A statement failed since the last commit (the database went away?):
            # check the connection now, as Django would at the next request,
            # rather than fail this transaction on it. Not close_old_connections:
            # it would close the connection of an open atomic block, and every
            # alias's, and, with CONN_MAX_AGE = 0, a healthy one too.
            connection.close_if_unusable_or_obsolete()
        try:
            with transaction.atomic(using=self._alias):
                yield _Transaction(self._alias)
        except self.unavailable:
            connections[self._alias].close()
            raise

    def run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one statement in a transaction of its own."""
        with self.atomic() as tx:
            return tx.query(sql, params)
