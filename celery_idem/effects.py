"""Side effects inside an idempotent task: fenced database transactions and durable steps.

``self.idempotency`` in a protected run is a :class:`Run`. Two tools make an effect
made mid-body happen once, even when the worker dies after the effect and the run
that takes the key over runs the body again:

* :meth:`Run.transaction` runs ``fn(conn, ...)`` in one database transaction that
  also writes a row for (record key, step name) holding the run's fence and
  ``fn``'s return value. A later run of the key finds the row and returns the value
  without calling ``fn``; a run that was taken over (a higher fence has written for
  the key) has its transaction rolled back (:class:`~celery_idem.errors.FenceRefused`).
  The effect and the proof that it happened commit together.
* :meth:`Run.step` runs ``fn(...)`` and stores its value in Redis beside the record,
  under the run's lease; a later run of the key returns the stored value. An effect
  outside any database (an HTTP call) can still happen twice if the worker dies
  between the call and the store: pass ``self.idempotency.key`` and the step name to
  the provider as its idempotency key.

The database is reached through a small interface, :class:`Database`, with adapters
for psycopg (:mod:`celery_idem.contrib.postgres`), SQLAlchemy
(:mod:`celery_idem.contrib.sqlalchemy`) and Django
(:mod:`celery_idem.contrib.django`); each imports its library only when used.

The step table (``celery_idem_steps``)::

    record_key  text     the Redis key of the record        } primary key
    name        text     the step's name                    }
    fence       bigint   the fence of the run that wrote it
    digest      text     SHA-256 of the step's arguments
    ctype       text     content type of the value
    cenc        text     content encoding of the value
    value       bytea    the encoded return value of fn
    expires_at  bigint   ms since the epoch; rows past it are deleted

A transaction costs one statement in the user's transaction on a key's first
attempt (the insert of its row) and two on later attempts (a lookup first, so that
``fn`` is not called again).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from kombu.serialization import prepare_accept_content

from .codec import decode_failure, decode_result, encode_failure, encode_result
from .errors import (
    BackendUnavailable,
    DatabaseUnavailable,
    DuplicateStepName,
    FenceRefused,
    IdempotencyKeyError,
    ImproperlyConfigured,
    LeaseLost,
    StepMismatch,
    describe_error,
)
from .keys import canonical_json, encode_value
from .store import BACKEND_ERRORS, Outcome

if TYPE_CHECKING:
    from celery import Celery

    from .config import DatabaseSpec, IdempotencyConfig
    from .lease import Lease
    from .task import IdempotentTask

__all__ = [
    "NO_ARGUMENT",
    "RESULT_STEP",
    "SCHEMA",
    "TABLE",
    "Database",
    "Run",
    "Transaction",
    "database_for",
    "purge_steps",
    "reset_databases",
]

T = TypeVar("T")

#: The step table's name.
TABLE = "celery_idem_steps"

#: The step table, for PostgreSQL (and any database with these types).
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    record_key text NOT NULL,
    name text NOT NULL,
    fence bigint NOT NULL,
    digest text NOT NULL,
    ctype text NOT NULL,
    cenc text NOT NULL,
    value bytea NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (record_key, name)
);
CREATE INDEX IF NOT EXISTS {TABLE}_expires_at ON {TABLE} (expires_at)
"""

#: The row of a step, or any row of the key written by a higher fence.
_LOOKUP = (
    f"SELECT name, fence, digest, ctype, cenc, value FROM {TABLE} "
    "WHERE record_key = %s AND (name = %s OR fence > %s) ORDER BY fence DESC"
)
#: Write a step's row unless a higher fence has written for the key.
_INSERT = (
    f"INSERT INTO {TABLE} (record_key, name, fence, digest, ctype, cenc, value, expires_at) "
    f"SELECT %s, %s, %s, %s, %s, %s, %s, %s WHERE NOT EXISTS "
    f"(SELECT 1 FROM {TABLE} WHERE record_key = %s AND fence > %s)"
)
_READ = f"SELECT name, fence, digest, ctype, cenc, value FROM {TABLE} WHERE record_key = %s AND name = %s"
_PURGE = f"DELETE FROM {TABLE} WHERE expires_at < %s"

#: Step rows are deleted this long after they were written, at the soonest: a run
#: of the key may still replay them while its record lives.
_PURGE_EVERY = 600.0

#: The step name under which ``idempotency_transaction`` stores the task's result.
RESULT_STEP = "celery_idem.result"

#: ``Transaction.argument`` of an adapter whose ``fn`` takes no connection (Django).
NO_ARGUMENT: Any = object()


class Transaction(Protocol):
    """One open database transaction, as an adapter hands it to :meth:`Run.transaction`."""

    #: What ``fn`` receives before its arguments (a connection), or :data:`NO_ARGUMENT`.
    argument: Any

    def query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run ``sql`` (``%s`` placeholders) and return its rows."""

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """Run ``sql`` and return how many rows it changed."""


class Database(Protocol):
    """Where :meth:`Run.transaction` writes: one small interface, an adapter per library."""

    #: Where, for messages (no password).
    where: str
    #: Errors that mean "the database cannot be reached now", as opposed to a bug.
    unavailable: tuple[type[BaseException], ...]
    #: The error a duplicate primary key raises.
    conflict: tuple[type[BaseException], ...]

    def atomic(self) -> AbstractContextManager[Transaction]:
        """A transaction: committed when the block ends, rolled back if it raises."""

    def run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run one statement in a transaction of its own and return its rows."""


_databases: dict[Any, Database] = {}
_databases_lock = threading.Lock()
_last_purge: dict[int, float] = {}


def database_for(spec: DatabaseSpec) -> Database:
    """This process's adapter for ``spec`` (made, and its library imported, on first use)."""
    cache_key = (
        spec.kind,
        spec.where,
        json.dumps(dict(spec.options), sort_keys=True, default=repr),
        id(spec.target),
    )
    database = _databases.get(cache_key)
    if database is None:
        with _databases_lock:
            database = _databases.get(cache_key)
            if database is None:
                database = _databases[cache_key] = _make(spec)
    return database


def reset_databases(app: Celery | None = None) -> None:
    """Forget every adapter: a forked child must not share its parent's connections.

    With ``app`` (in a new pool process), the SQLAlchemy Engines its tasks write to
    forget, unclosed, the connections their pools hold: they are the parent's, and
    a parent that used the Engine before the pool forked (at import, say) would
    otherwise have them checked out by every child at once.
    """
    with _databases_lock:
        _databases.clear()
        _last_purge.clear()
    if app is None:
        return
    engines = {}
    for task in list(app.tasks.values()):
        config = getattr(type(task), "_resolved_idempotency", None)
        spec = getattr(config, "database", None)
        if spec is not None and spec.kind == "sqlalchemy":
            engines[id(spec.target)] = spec.target
    if engines:
        from .contrib.sqlalchemy import forget_inherited_connections

        for engine in engines.values():
            forget_inherited_connections(engine)


def _make(spec: DatabaseSpec) -> Database:
    if spec.kind == "postgres":
        from .contrib.postgres import PostgresDatabase

        return PostgresDatabase(spec.target, spec.options)
    if spec.kind == "sqlalchemy":
        from .contrib.sqlalchemy import SQLAlchemyDatabase

        return SQLAlchemyDatabase(spec.target)
    if spec.kind == "django":
        from .contrib.django import DjangoDatabase

        return DjangoDatabase(spec.target)
    database: Database = spec.target
    return database


def purge_steps(database: Database) -> int:
    """Delete the step rows whose time has passed; return how many.

    A row is kept for ``idempotency_result_ttl`` plus ``idempotency_lock_ttl`` after it
    was written (as long as a run of its key can still replay it). Workers call this
    every ten minutes per process after a transaction; call it from a periodic task
    (or ``manage.py celery_idem_purge_steps`` with Django) if transactions are rare.
    """
    with database.atomic() as tx:
        return tx.execute(_PURGE, (int(time.time() * 1000),))


def _maybe_purge(database: Database) -> None:
    """Delete expired step rows, at most every ten minutes per process and database."""
    now = time.monotonic()
    last = _last_purge.get(id(database))
    if last is not None and now - last < _PURGE_EVERY:
        return
    _last_purge[id(database)] = now
    try:
        purge_steps(database)
    except database.unavailable:
        pass  # the next transaction tries again in ten minutes


def _digest(step: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    try:
        encoded = {
            "args": [encode_value(value, f"args[{i}]") for i, value in enumerate(args)],
            "kwargs": {name: encode_value(value, name) for name, value in kwargs.items()},
        }
    except IdempotencyKeyError as exc:
        raise IdempotencyKeyError(
            f"step {step!r} stores a digest of its arguments, to tell a changed call from a "
            f"replay, and cannot make one: {exc}"
        ) from exc
    return hashlib.sha256(canonical_json(encoded)).hexdigest()


def _pack(digest: str, failed: bool, outcome: Outcome) -> bytes:
    header = json.dumps([digest, failed, outcome.content_type, outcome.content_encoding])
    return header.encode() + b"\n" + outcome.data


def _unpack(blob: bytes) -> tuple[str, bool, Outcome]:
    header, _, data = blob.partition(b"\n")
    digest, failed, content_type, content_encoding = json.loads(header)
    return digest, bool(failed), Outcome(data, content_type, content_encoding)


class Run:
    """The current protected run of an idempotent task: ``self.idempotency`` in its body.

    ``key`` is stable for every delivery of the call, ``token`` and ``fence`` are
    higher for every run that takes the key over (``fence`` also across a record
    that expired and was made again), and ``lost`` turns True once a renewal found
    the key taken over. :meth:`transaction` and :meth:`step` make effects once.
    """

    def __init__(
        self,
        task: IdempotentTask,
        config: IdempotencyConfig,
        lease: Lease,
        fence: int,
        first: bool,
        steps: Mapping[str, bytes],
    ) -> None:
        self._task = task
        self._config = config
        self.lease = lease
        #: Grows across every run of the key; what the step table compares.
        self.fence = fence
        #: True when no earlier run of the key existed (nothing can be stored yet).
        self.first = first
        self._steps = dict(steps)
        self._names: set[str] = set()
        #: Steps replayed, transactions run and transactions replayed, for the counters.
        self._counts = [0, 0, 0]
        #: The connection of the transaction the whole body runs in (``idempotency_transaction``).
        self.connection: Any = None

    @property
    def task(self) -> IdempotentTask:
        """The task this run is of."""
        return self._task

    def counts(self) -> tuple[int, int, int]:
        """Steps replayed, transactions run, transactions replayed: counted when the run ends."""
        return (self._counts[0], self._counts[1], self._counts[2])

    @property
    def key(self) -> str:
        """The Redis key of the record: the same for every delivery of this call."""
        return self.lease.key

    @property
    def token(self) -> int:
        """The fencing token of this run: higher than any earlier run's of this record."""
        return self.lease.token

    @property
    def lost(self) -> bool:
        """True once a renewal found that another run holds (or finished) the key."""
        return self.lease.lost

    def __repr__(self) -> str:
        return f"<Run {self.key} token={self.token} fence={self.fence}{' lost' if self.lost else ''}>"

    # -- steps in Redis ---------------------------------------------------------------

    def step(self, fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` unless this key already stored its value, and return it.

        The value is stored in Redis beside the record, by a script that writes only
        while this run holds the lease (else :class:`~celery_idem.errors.LeaseLost`).
        An exception is not stored, so the step runs again on the next attempt, unless
        its class is in ``idempotency_cache_errors``: then it is re-raised by every
        later run. A stored step called with other arguments raises
        :class:`~celery_idem.errors.StepMismatch`.
        """
        step = self._claim_name(fn, name)
        digest = _digest(step, args, kwargs)
        stored = self._steps.get(step)
        if stored is not None:
            stored_digest, failed, outcome = _unpack(stored)
            self._counts[0] += 1
            return self._replay(step, digest, outcome, failed, stored_digest)  # type: ignore[no-any-return]
        if self.lost:
            raise LeaseLost(self.key, self.token, "taken over", 0)
        try:
            value = fn(*args, **kwargs)
        except self._config.cache_errors as exc:
            self._store_step(step, _pack(digest, True, self._encode_failure(exc)))
            raise
        self._store_step(step, _pack(digest, False, self._encode(value, step)))
        return value

    def _store_step(self, step: str, blob: bytes) -> None:
        store = self.lease.store
        give_up = time.monotonic() + self._config.lock_ttl
        delay = 0.05
        while True:
            try:
                store.store_step(self.key, self.token, step, blob, self.lease.task)
            except BACKEND_ERRORS as exc:
                # The step ran: keep trying to store it for as long as the lease lasts.
                if time.monotonic() + delay > give_up:
                    raise BackendUnavailable(store.url, describe_error(exc)) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            else:
                self._steps[step] = blob
                return

    # -- transactions in the database -------------------------------------------------

    def transaction(self, fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` once per key, in one transaction with its proof.

        The transaction also writes the step's row (record key, name, this run's
        fence, ``fn``'s encoded return value). If the row exists, ``fn`` is not
        called and its stored value is returned. If a run with a higher fence has
        already written for this key, the transaction is rolled back and
        :class:`~celery_idem.errors.FenceRefused` (a ``LeaseLost``) is raised. If
        the database cannot be reached, :class:`~celery_idem.errors.DatabaseUnavailable`
        is raised and the run follows ``idempotency_on_backend_error``. ``fn``
        receives a psycopg ``Connection`` (psycopg), a SQLAlchemy ``Connection``
        (SQLAlchemy), or nothing (Django: it runs inside ``transaction.atomic``).
        """
        step = self._claim_name(fn, name)
        digest = _digest(step, args, kwargs)
        if self.lost:
            raise LeaseLost(self.key, self.token, "taken over", 0)
        database = self._database()
        try:
            try:
                with database.atomic() as tx:
                    if not self.first:
                        rows = tx.query(_LOOKUP, (self.key, step, self.fence))
                        if rows:
                            replayed: T = self._from_row(step, digest, rows)
                            self._counts[2] += 1
                            return replayed
                    value = (
                        fn(*args, **kwargs)
                        if tx.argument is NO_ARGUMENT
                        else fn(tx.argument, *args, **kwargs)
                    )
                    self._insert(tx, step, digest, self._encode(value, step))
            except database.conflict:
                # Another run wrote this step meanwhile (its transaction committed
                # while ours ran): ours rolled back; theirs stands. Any other
                # integrity error is the body's own.
                rows = database.run(_READ, (self.key, step))
                if not rows:
                    raise
                winner: T = self._from_row(step, digest, rows)
                self._counts[2] += 1
                return winner
        except database.unavailable as exc:
            raise DatabaseUnavailable(database.where, describe_error(exc)) from exc
        self._counts[1] += 1
        _maybe_purge(database)
        return value

    def _insert(self, tx: Transaction, step: str, digest: str, outcome: Outcome) -> None:
        expires_at = int((time.time() + self._config.result_ttl + self._config.lock_ttl) * 1000)
        written = tx.execute(
            _INSERT,
            (
                self.key,
                step,
                self.fence,
                digest,
                outcome.content_type,
                outcome.content_encoding,
                outcome.data,
                expires_at,
                self.key,
                self.fence,
            ),
        )
        if not written:
            higher = tx.query(f"SELECT max(fence) FROM {TABLE} WHERE record_key = %s", (self.key,))
            raise FenceRefused(self.key, self.token, self.fence, int(higher[0][0]), step)

    def _from_row(self, step: str, digest: str, rows: list[tuple[Any, ...]]) -> Any:
        mine = [row for row in rows if row[0] == step]
        if not mine or int(mine[0][1]) > self.fence:
            raise FenceRefused(self.key, self.token, self.fence, max(int(row[1]) for row in rows), step)
        _, _, stored_digest, content_type, content_encoding, data = mine[0]
        outcome = Outcome(bytes(data), content_type, content_encoding)
        return self._replay(step, digest, outcome, False, stored_digest)

    def whole_body(self, body: Callable[[], Any]) -> tuple[Any, Outcome]:
        """Run ``body()`` in one transaction that also stores its encoded result.

        For ``idempotency_transaction=True``: ``self.idempotency.connection`` is the
        transaction's connection while the body runs. If an earlier run of the key
        committed its transaction (it died before its Redis commit), its stored
        result is returned without running the body. Returns the result (the
        decoded stored one on a replay) and its encoded form, for the Redis commit.
        """
        database = self._database()
        step = RESULT_STEP
        try:
            with database.atomic() as tx:
                if not self.first:
                    rows = tx.query(_LOOKUP, (self.key, step, self.fence))
                    if rows:
                        return self._stored_result(step, rows)
                self.connection = None if tx.argument is NO_ARGUMENT else tx.argument
                try:
                    result = body()
                finally:
                    self.connection = None
                outcome = self._encode(result, "result")
                self._insert(tx, step, "", outcome)
        except database.conflict:
            rows = database.run(_READ, (self.key, step))
            if not rows:
                raise
            return self._stored_result(step, rows)
        except database.unavailable as exc:
            raise DatabaseUnavailable(database.where, describe_error(exc)) from exc
        _maybe_purge(database)
        return result, outcome

    def _stored_result(self, step: str, rows: list[tuple[Any, ...]]) -> tuple[Any, Outcome]:
        mine = [row for row in rows if row[0] == step]
        if not mine or int(mine[0][1]) > self.fence:
            raise FenceRefused(self.key, self.token, self.fence, max(int(row[1]) for row in rows), step)
        _, _, _, content_type, content_encoding, data = mine[0]
        outcome = Outcome(bytes(data), content_type, content_encoding)
        return self._replay(step, "", outcome, False, ""), outcome

    # -- shared -----------------------------------------------------------------------

    def _claim_name(self, fn: Callable[..., Any], name: str | None) -> str:
        if name is None:
            name = f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', repr(fn))}"
        elif not isinstance(name, str) or not name:
            raise IdempotencyKeyError(f"a step's name must be a non-empty str, got {name!r}")
        if name in self._names:
            raise DuplicateStepName(name)
        self._names.add(name)
        return name

    def _replay(self, step: str, digest: str, outcome: Outcome, failed: bool, stored_digest: str) -> Any:
        if stored_digest != digest:
            raise StepMismatch(self.key, step)
        accept = prepare_accept_content(self._task.app.conf.accept_content)
        if failed:
            raise decode_failure(outcome, accept, self._task.backend, self.key)
        return decode_result(outcome, accept, self.key)

    def _encode(self, value: Any, step: str) -> Outcome:
        task = self._task
        return encode_result(
            task.backend.prepare_value(value),
            task.serializer,
            f"{task.name} step {step!r}",
            self._config.max_result_bytes,
        )

    def _encode_failure(self, exc: BaseException) -> Outcome:
        return encode_failure(exc, self._task.backend, self._task.serializer)

    def _database(self) -> Database:
        spec = self._config.database
        if spec is None:
            raise ImproperlyConfigured(
                f"{self._task.name} calls self.idempotency.transaction but no database is configured: "
                "set idempotency_database_url (PostgreSQL) or idempotency_database"
            )
        return database_for(spec)
