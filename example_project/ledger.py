"""The ledger the tasks write to: charges, receipts and settlements, in SQL.

SQLite by default (``LEDGER_URL=sqlite:///path``; WAL mode, so the workers'
processes write concurrently) or PostgreSQL (``LEDGER_URL=postgresql://...``, with
psycopg 3). No table has a unique constraint on its order id: a task that runs
twice writes two rows, which is what the demo counts.

What keeps the writes of an idempotent task unique is its fencing token
(``self.idempotency.token``), which every write carries. Per order, a write under

* a token *lower* than one already recorded is refused with :class:`StaleWrite`:
  it comes from a run whose lease was taken over, perhaps one that was paused and
  woke up, and it must no longer act on the order;
* a *higher* token replaces the row of the lower one: that run wrote and was then
  cut off before it could record its result, and the run that took over its lease
  did the work again, so the newer write is the one that counts (the row keeps the
  token it replaced in ``superseded_fence``);
* the *same* token returns the row already written: the same run writing again.

A write without a token (``fence=None``: a plain ``celery.Task``, as in the demo's
comparison run) is a plain insert, never refused, so its duplicates stay visible.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import settings

__all__ = ["Ledger", "StaleWrite", "Tally", "for_this_process"]

#: Each table and the column a duplicate is counted on.
TABLES = {"charges": "order_id", "receipts": "order_id", "settlements": "batch_id"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id {id},
    order_id BIGINT NOT NULL,
    amount_cents BIGINT NOT NULL,
    fence BIGINT,
    superseded_fence BIGINT,
    task_id TEXT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS charges_order_id ON charges (order_id);
CREATE TABLE IF NOT EXISTS receipts (
    id {id},
    order_id BIGINT NOT NULL,
    charge_id BIGINT NOT NULL,
    fence BIGINT,
    superseded_fence BIGINT,
    task_id TEXT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS receipts_order_id ON receipts (order_id);
CREATE TABLE IF NOT EXISTS settlements (
    id {id},
    batch_id BIGINT NOT NULL,
    fence BIGINT,
    superseded_fence BIGINT,
    task_id TEXT NOT NULL,
    worker_pid INTEGER NOT NULL,
    created_at {now}
);
CREATE INDEX IF NOT EXISTS settlements_batch_id ON settlements (batch_id);
"""


class StaleWrite(Exception):
    """A write carried a lower fencing token than one the ledger already recorded."""

    def __init__(self, table: str, key: int, fence: int, recorded: int) -> None:
        super().__init__(
            f"refused a write to {table} for {TABLES[table]} {key} under fencing token {fence}: "
            f"token {recorded} already wrote it, so this run's lease was taken over"
        )
        self.table = table
        self.key = key
        self.fence = fence
        self.recorded = recorded


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
    """A connection to the ledger at ``url``, for one process."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self._db: _Database = _SQLite(url[len("sqlite:///") :])
        elif url.startswith(("postgresql://", "postgres://")):
            self._db = _Postgres(url)
        else:
            raise ValueError(f"LEDGER_URL must be sqlite:///path or postgresql://...; got {url!r}")

    def create_schema(self) -> None:
        """Create the tables unless they exist."""
        self._db.create_schema()

    def record_charge(self, order_id: int, amount_cents: int, fence: int | None, task_id: str) -> int:
        """Write the charge of ``order_id`` and return its row id."""
        return self._write("charges", order_id, {"amount_cents": amount_cents}, fence, task_id)

    def record_receipt(self, order_id: int, charge_id: int, fence: int | None, task_id: str) -> int:
        """Write the receipt of a charge and return its row id."""
        return self._write("receipts", order_id, {"charge_id": charge_id}, fence, task_id)

    def record_settlement(self, batch_id: int, fence: int | None, task_id: str) -> int:
        """Write the settlement of ``batch_id`` and return its row id."""
        return self._write("settlements", batch_id, {}, fence, task_id)

    def tally(self, table: str, keys: Iterable[int]) -> Tally:
        """Count the rows of ``table`` for ``keys`` (order ids, or batch ids)."""
        column = TABLES[table]
        wanted = sorted(set(keys))
        if not wanted:
            return Tally(0, 0, ())
        found = self._db.fetchall(
            f"SELECT {column}, COUNT(*) FROM {table} WHERE {column} BETWEEN ? AND ? GROUP BY {column}",
            (wanted[0], wanted[-1]),
        )
        present = set(wanted)
        counts = {key: count for key, count in found if key in present}
        missing = tuple(key for key in wanted if key not in counts)
        return Tally(rows=sum(counts.values()), distinct=len(counts), missing=missing)

    def highest_order_id(self) -> int:
        """The highest order id charged so far, 0 if none."""
        ((highest,),) = self._db.fetchall("SELECT COALESCE(MAX(order_id), 0) FROM charges")
        return int(highest)

    def rows(self, table: str, key: int) -> list[dict[str, Any]]:
        """Every row of ``table`` for one order (or batch), oldest first."""
        return self._db.fetchall_dicts(f"SELECT * FROM {table} WHERE {TABLES[table]} = ? ORDER BY id", (key,))

    def close(self) -> None:
        self._db.close()

    def _write(self, table: str, key: int, values: dict[str, Any], fence: int | None, task_id: str) -> int:
        row = {TABLES[table]: key, **values, "fence": fence, "task_id": task_id, "worker_pid": os.getpid()}
        if fence is None:
            return self._db.insert(table, row)
        with self._db.transaction(f"{table}:{key}"):
            latest = self._db.fetchall(
                f"SELECT id, fence FROM {table} WHERE {TABLES[table]} = ? AND fence IS NOT NULL "
                "ORDER BY fence DESC LIMIT 1",
                (key,),
            )
            if not latest:
                return self._db.insert(table, row)
            row_id, recorded = latest[0]
            if fence < recorded:
                raise StaleWrite(table, key, fence, recorded)
            if fence > recorded:
                changes = {**row, "superseded_fence": recorded}
                assignments = ", ".join(f"{name} = ?" for name in changes)
                self._db.execute(
                    f"UPDATE {table} SET {assignments} WHERE id = ?", (*changes.values(), row_id)
                )
            return int(row_id)


_ledgers: dict[int, Ledger] = {}


def for_this_process() -> Ledger:
    """The ledger at ``LEDGER_URL``, schema created, for this process.

    One connection per process: a forked pool process opens its own.
    """
    pid = os.getpid()
    ledger = _ledgers.get(pid)
    if ledger is None:
        ledger = _ledgers[pid] = Ledger(settings.LEDGER_URL)
        ledger.create_schema()
    return ledger


class _Database:
    """What the ledger needs of a database: the SQL dialects differ a little."""

    def create_schema(self) -> None:
        raise NotImplementedError

    def transaction(self, lock: str) -> Any:
        """A transaction that holds ``lock`` (one order of one table) until it ends."""
        raise NotImplementedError

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        raise NotImplementedError

    def insert(self, table: str, row: dict[str, Any]) -> int:
        raise NotImplementedError

    def fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return [tuple(found) for found in self.execute(sql, params).fetchall()]

    def fetchall_dicts(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cursor = self.execute(sql, params)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, found)) for found in cursor.fetchall()]

    def close(self) -> None:
        raise NotImplementedError


class _SQLite(_Database):
    def __init__(self, path: str) -> None:
        # isolation_level=None: no implicit transactions; writes that must see a
        # consistent ledger open their own with BEGIN IMMEDIATE. The timeout is
        # SQLite's busy timeout: how long a write waits for another process's lock.
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")

    def create_schema(self) -> None:
        schema = _SCHEMA.format(
            id="INTEGER PRIMARY KEY AUTOINCREMENT",
            now="TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP",
        )
        self.connection.executescript(schema)

    @contextmanager
    def transaction(self, lock: str) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the database's write lock now, so the check and the
        # write below it cannot interleave with another process's.
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.connection.execute(sql, params)

    def insert(self, table: str, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cursor = self.connection.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
        )
        return int(cursor.lastrowid or 0)

    def close(self) -> None:
        self.connection.close()


class _Postgres(_Database):
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise RuntimeError(
                "a postgresql:// LEDGER_URL needs psycopg 3: pip install 'psycopg[binary]' "
                "(the demo extra installs it)"
            ) from None
        self.connection = psycopg.connect(url, autocommit=True)

    def create_schema(self) -> None:
        schema = _SCHEMA.format(
            id="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            now="TIMESTAMPTZ NOT NULL DEFAULT now()",
        )
        # Two processes creating the same table at once can collide in the catalog.
        with self.transaction("schema"):
            self.connection.execute(schema)

    @contextmanager
    def transaction(self, lock: str) -> Iterator[None]:
        # No unique constraint to lean on, so concurrent writers of one order are
        # serialised by an advisory lock held until the transaction ends.
        with self.connection.transaction():
            self.connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
            yield

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.connection.execute(sql.replace("?", "%s"), params)

    def insert(self, table: str, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("%s" for _ in row)
        cursor = self.connection.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING id", tuple(row.values())
        )
        found = cursor.fetchone()
        assert found is not None
        return int(found[0])

    def close(self) -> None:
        self.connection.close()
