"""The ledger the tasks write to: charges, receipts and settlements, in SQL.

SQLite by default (``LEDGER_URL=sqlite:///path``), through a SQLAlchemy ``Engine``,
or PostgreSQL (``LEDGER_URL=postgresql://...``), through psycopg 3. No table has a
unique constraint on its order id: a charge made twice is two rows, which is what
the demo counts.

The writes are functions of an open transaction's connection (``record_charge``,
``record_receipt``, ``record_settlement``), so that an idempotent task can hand them
to ``self.idempotency.transaction``: the row and the record that proves it was
written (celery_idem's step row, under the run's fence) commit together, and a run
that takes over from one killed after that commit gets the row's id back without
writing again. A plain ``celery.Task`` (the demo's comparison) runs the same
functions through :meth:`Ledger.write`, in a transaction of their own, every time
its body runs. The functions take a SQLAlchemy ``Connection`` (SQLite) or a psycopg
``Connection`` (PostgreSQL), whichever the ledger's database gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from . import settings

__all__ = [
    "Ledger",
    "Tally",
    "for_this_process",
    "is_postgres",
    "record_charge",
    "record_receipt",
    "record_settlement",
    "sqlite_engine",
]

T = TypeVar("T")

#: Each table and the column a duplicate is counted on.
TABLES = {"charges": "order_id", "receipts": "order_id", "settlements": "batch_id"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id {id},
    order_id BIGINT NOT NULL,
    amount_cents BIGINT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS charges_order_id ON charges (order_id);
CREATE TABLE IF NOT EXISTS receipts (
    id {id},
    order_id BIGINT NOT NULL,
    charge_id BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS receipts_order_id ON receipts (order_id);
CREATE TABLE IF NOT EXISTS settlements (
    id {id},
    batch_id BIGINT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS settlements_batch_id ON settlements (batch_id);
"""

# -- the writes, in the transaction they are given -------------------------------------
#
# They take only the order's own values: celery_idem stores a digest of a
# transaction's arguments, and a run that takes the key over from another message
# (another task id) must call it with the same ones to be handed the stored row.


def record_charge(conn: Any, order_id: int, amount_cents: int) -> int:
    """Write the charge of ``order_id``; return its row id."""
    return _insert(conn, "charges", {"order_id": order_id, "amount_cents": amount_cents})


def record_receipt(conn: Any, order_id: int, charge_id: int, message_id: str) -> int:
    """Write the receipt of a charge, sent as the provider's ``message_id``; return its row id."""
    return _insert(conn, "receipts", {"order_id": order_id, "charge_id": charge_id, "message_id": message_id})


def record_settlement(conn: Any, batch_id: int) -> int:
    """Write the settlement of ``batch_id``; return its row id."""
    return _insert(conn, "settlements", {"batch_id": batch_id})


def _insert(conn: Any, table: str, values: dict[str, Any]) -> int:
    row = {**values, "worker_pid": os.getpid()}
    columns = ", ".join(row)
    if _is_sqlalchemy(conn):
        marks = ", ".join("?" for _ in row)
        result = conn.exec_driver_sql(
            f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
        )
        return int(result.lastrowid)
    marks = ", ".join("%s" for _ in row)
    found = conn.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING id", tuple(row.values())
    ).fetchone()
    return int(found[0])


def _is_sqlalchemy(conn: Any) -> bool:
    return hasattr(conn, "exec_driver_sql")


def _query(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``%s`` placeholders) on either kind of connection."""
    if _is_sqlalchemy(conn):
        return [tuple(row) for row in conn.exec_driver_sql(sql.replace("%s", "?"), tuple(params))]
    return [tuple(row) for row in conn.execute(sql, tuple(params)).fetchall()]


# -- the databases -----------------------------------------------------------------------


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def sqlite_engine(path: str) -> Any:
    """A SQLAlchemy ``Engine`` for the SQLite file at ``path``, safe for concurrent writers.

    Several worker processes write to one file. SQLite lets a transaction that read
    first fail at once with "database is locked" when it then tries to write while
    another process writes (the busy timeout does not apply to that lock upgrade).
    So every transaction takes the write lock when it begins (``BEGIN IMMEDIATE``),
    waiting up to the busy timeout for it, and pysqlite is kept from issuing
    ``BEGIN`` itself (SQLAlchemy's recipe for pysqlite transactions). WAL lets the
    demo's counts read while the workers write.
    """
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # no BEGIN of pysqlite's own
        dbapi_connection.execute("PRAGMA journal_mode=WAL")

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@dataclass(frozen=True)
class Tally:
    """What one table holds for a set of orders (or batches)."""

    rows: int
    distinct: int
    missing: tuple[int, ...]

    @property
    def duplicates(self) -> int:
        """Rows beyond the first of each order."""
        return self.rows - self.distinct


class Ledger:
    """The ledger at ``url``, for one process: its schema, plain writes, and counts.

    ``engine`` is the SQLAlchemy ``Engine`` of a SQLite ledger (what the app hands to
    ``idempotency_database``), None for PostgreSQL (the app gives celery_idem the URL,
    ``idempotency_database_url``, and this object keeps a psycopg connection of its own).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid = os.getpid()
        self.engine: Any = None
        self._pg: Any = None
        if url.startswith("sqlite:///"):
            self.engine = sqlite_engine(url[len("sqlite:///") :])
        elif not is_postgres(url):
            raise ValueError(f"LEDGER_URL must be sqlite:///path or postgresql://...; got {url!r}")

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A transaction on this process's connection: committed at the end, rolled back on error."""
        if self.engine is not None:
            with self.engine.begin() as conn:
                yield conn
            return
        if self._pg is None or self._pg.closed or self._pg.broken:
            try:
                import psycopg
            except ImportError:
                raise RuntimeError(
                    "a postgresql:// LEDGER_URL needs psycopg 3: pip install 'psycopg[binary]' "
                    "(the demo extra installs it)"
                ) from None
            self._pg = psycopg.connect(self.url, autocommit=True)
        with self._pg.transaction():
            yield self._pg

    def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a transaction of its own: a plain, unprotected write."""
        with self.transaction() as conn:
            return fn(conn, *args)

    def create_schema(self) -> None:
        """Create the tables unless they exist."""
        if self.engine is not None:
            schema = _SCHEMA.format(
                id="INTEGER PRIMARY KEY AUTOINCREMENT", now="TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP"
            )
        else:
            schema = _SCHEMA.format(
                id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", now="TIMESTAMPTZ NOT NULL DEFAULT now()"
            )
        with self.transaction() as conn:
            if not _is_sqlalchemy(conn):
                # Two processes creating the same table at once can collide in the catalog.
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('example ledger', 0))")
            for statement in schema.split(";"):
                if statement.strip():
                    if _is_sqlalchemy(conn):
                        conn.exec_driver_sql(statement)
                    else:
                        conn.execute(statement)

    def tally(self, table: str, keys: Iterable[int]) -> Tally:
        """Count the rows of ``table`` for ``keys`` (order ids, or batch ids)."""
        column = TABLES[table]
        wanted = sorted(set(keys))
        if not wanted:
            return Tally(0, 0, ())
        with self.transaction() as conn:
            found = _query(
                conn,
                f"SELECT {column}, COUNT(*) FROM {table} WHERE {column} BETWEEN %s AND %s GROUP BY {column}",
                (wanted[0], wanted[-1]),
            )
        present = set(wanted)
        counts = {key: count for key, count in found if key in present}
        missing = tuple(key for key in wanted if key not in counts)
        return Tally(rows=sum(counts.values()), distinct=len(counts), missing=missing)

    def highest_order_id(self) -> int:
        """The highest order id charged so far, 0 if none."""
        with self.transaction() as conn:
            ((highest,),) = _query(conn, "SELECT COALESCE(MAX(order_id), 0) FROM charges")
        return int(highest)

    def rows(self, table: str, key: int) -> list[dict[str, Any]]:
        """Every row of ``table`` for one order (or batch), oldest first."""
        with self.transaction() as conn:
            if _is_sqlalchemy(conn):
                result = conn.exec_driver_sql(
                    f"SELECT * FROM {table} WHERE {TABLES[table]} = ? ORDER BY id", (key,)
                )
                return [dict(row._mapping) for row in result]
            cursor = conn.execute(f"SELECT * FROM {table} WHERE {TABLES[table]} = %s ORDER BY id", (key,))
            names = [column.name for column in cursor.description]
            return [dict(zip(names, found)) for found in cursor.fetchall()]

    def forked(self) -> None:
        """Forget the parent's connections in a forked child, without closing them under it."""
        if self.engine is not None:
            self.engine.dispose(close=False)
        self._pg = None
        self.pid = os.getpid()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        if self._pg is not None:
            self._pg.close()
            self._pg = None


_ledger: Ledger | None = None


def for_this_process() -> Ledger:
    """The ledger at ``LEDGER_URL``, one per process (a forked child drops the parent's connections).

    The app hands its ``engine`` to celery_idem when it is configured, so the worker's
    pool processes must reach it through here, which makes the engine's pool their
    own after the fork (``Engine.dispose(close=False)``, SQLAlchemy's recipe).
    """
    global _ledger
    if _ledger is None:
        _ledger = Ledger(settings.LEDGER_URL)
    elif _ledger.pid != os.getpid():
        _ledger.forked()
    return _ledger
