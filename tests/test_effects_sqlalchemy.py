"""Fenced transactions through a SQLAlchemy ``Engine``: the psycopg cases, on SQLAlchemy.

``idempotency_database`` is an ``Engine`` on PostgreSQL (psycopg 3 driver), with the
test's own schema as its search path; ``fn`` receives the transaction's
``Connection``. Eager runs against a real Redis and a real PostgreSQL; SQLite (a file
of the test's own) is tried for the replay too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from celery_idem import IdempotentTask
from celery_idem.effects import SCHEMA, reset_databases
from celery_idem.errors import DatabaseUnavailable, FenceRefused, ImproperlyConfigured, LeaseLost
from celery_idem.lease import renewer
from celery_idem.store import store_for
from tests.helpers import Boom, Proxy, attempts, lease_ended
from tests.worker_app import make_app

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:{port}/test"


class Base(DeclarativeBase):
    pass


class Ledger(Base):
    """The test schema's ledger table (no unique constraint: a duplicate shows as a row)."""

    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[str]
    cents: Mapped[int]


def postgres_engine(schema: str, port: int = 5432, **connect_args: Any) -> sqlalchemy.engine.Engine:
    return sqlalchemy.create_engine(
        POSTGRES.format(port=port), connect_args={"options": f"-csearch_path={schema}", **connect_args}
    )


@pytest.fixture
def engine(pg_schema: str) -> Iterator[sqlalchemy.engine.Engine]:
    engine = postgres_engine(pg_schema)
    yield engine
    reset_databases()
    engine.dispose()


@pytest.fixture
def app(redis_url: str, engine: sqlalchemy.engine.Engine) -> Any:
    app = make_app(
        {
            "broker_url": "memory://",
            "task_always_eager": True,
            "task_eager_propagates": True,
            "idempotency_redis_url": redis_url,
            "test_events_url": redis_url,
            "idempotency_database": engine,
        }
    )
    app.effects: dict[str, int] = {}
    return app


def add_ledger_row(conn: sqlalchemy.engine.Connection, order_id: str, cents: int) -> int:
    return int(
        conn.execute(
            text("INSERT INTO ledger (order_id, cents) VALUES (:order_id, :cents) RETURNING id"),
            {"order_id": order_id, "cents": cents},
        ).scalar_one()
    )


def add_ledger_row_with_a_session(conn: sqlalchemy.engine.Connection, order_id: str, cents: int) -> int:
    """The ORM in the same transaction: a ``Session`` bound to ``fn``'s connection."""
    with Session(bind=conn) as session:
        row = Ledger(order_id=order_id, cents=cents)
        session.add(row)
        # The session joined the connection's transaction: its commit leaves the
        # transaction to celery_idem, which commits it with the step's row.
        session.commit()
        return row.id


def ledger(engine: sqlalchemy.engine.Engine, order_id: str) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, cents FROM ledger WHERE order_id = :order_id ORDER BY id"),
            {"order_id": order_id},
        )
        return [(int(i), int(c)) for i, c in rows]


# -- transactions --------------------------------------------------------------------


def test_a_transaction_replays_after_a_crash_before_the_commit(
    app: Any, engine: sqlalchemy.engine.Engine
) -> None:
    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
        row = self.idempotency.transaction(add_ledger_row_with_a_session, order_id, cents)
        app.effects["attempts"] = app.effects.get("attempts", 0) + 1
        if app.effects["attempts"] == 1:
            raise Boom()  # the worker died after the transaction, before the commit
        return {"row": row}

    result = attempts(charge, "o1", 500)
    rows = ledger(engine, "o1")
    assert [cents for _, cents in rows] == [500]
    assert result == {"row": rows[0][0]}
    assert app.effects["attempts"] == 2


def test_a_transaction_that_raises_rolls_back_and_runs_again(
    app: Any, engine: sqlalchemy.engine.Engine
) -> None:
    def failing_once(conn: sqlalchemy.engine.Connection, order_id: str) -> int:
        row = add_ledger_row(conn, order_id, 1)
        app.effects["calls"] = app.effects.get("calls", 0) + 1
        if app.effects["calls"] == 1:
            raise Boom()  # inside the transaction: its writes are rolled back
        return row

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(failing_once, order_id)

    row = attempts(charge, "o2")
    assert ledger(engine, "o2") == [(row, 1)]
    assert app.effects["calls"] == 2


def test_a_run_taken_over_cannot_commit_its_transaction(
    app: Any, engine: sqlalchemy.engine.Engine, redis_url: str
) -> None:
    # Run A holds the key and stops (its lease runs out); run B takes over and
    # commits the transaction; A wakes up and tries the same transaction.
    gate, started = threading.Event(), threading.Event()
    store = store_for(redis_url, {})

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_validate_payload=False,  # the test's own flag differs between the runs
        idempotency_lock_ttl=0.3,
        idempotency_on_conflict="wait",
    )
    def charge(self: Any, order_id: str, zombie: bool) -> dict[str, Any]:
        if zombie:
            renewer().drop(self.idempotency.lease)  # as if the process were frozen
            started.set()
            gate.wait(30)
        row = self.idempotency.transaction(add_ledger_row, order_id, 700)
        return {"row": row, "fence": self.idempotency.fence}

    key = charge.record_key_for(("o3", False))
    with ThreadPoolExecutor(1) as pool:
        zombie = pool.submit(lambda: charge.apply(("o3", True), task_id="a").get(disable_sync_subtasks=False))
        assert started.wait(30)
        lease_ended(store.client, key)
        winner = charge.apply(("o3", False), task_id="b").get(disable_sync_subtasks=False)
        gate.set()
        with pytest.raises(FenceRefused) as refused:
            zombie.result(30)
    assert refused.value.current_fence == winner["fence"] > refused.value.fence
    assert ledger(engine, "o3") == [(winner["row"], 700)]


def test_two_runs_racing_in_one_transaction_make_one_effect_and_return_its_value(
    app: Any, engine: sqlalchemy.engine.Engine, redis_url: str
) -> None:
    # A is taken over while frozen; B, the new run, is inside fn when A wakes up
    # and commits the same transaction first. B's write of the step conflicts:
    # B's transaction rolls back and B returns what A's committed.
    a_frozen, a_go, b_inside, b_go = (threading.Event() for _ in range(4))
    store = store_for(redis_url, {})
    current = threading.local()

    def effect(conn: Any, order_id: str) -> int:
        if current.run == "b":
            b_inside.set()
            b_go.wait(30)
        return add_ledger_row(conn, order_id, 11)

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_validate_payload=False,  # the test's own flag differs between the runs
        idempotency_lock_ttl=0.3,
    )
    def charge(self: Any, order_id: str, run: str) -> int:
        if run == "a":
            renewer().drop(self.idempotency.lease)  # as if the process were frozen
            a_frozen.set()
            a_go.wait(30)
        current.run = run
        return self.idempotency.transaction(effect, order_id, name="charge")

    key = charge.record_key_for(("o11", "a"))
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(lambda: charge.apply(("o11", "a"), task_id="a").get(disable_sync_subtasks=False))
        assert a_frozen.wait(30)
        lease_ended(store.client, key)
        b = pool.submit(lambda: charge.apply(("o11", "b"), task_id="b").get(disable_sync_subtasks=False))
        assert b_inside.wait(30)
        a_go.set()
        with pytest.raises(LeaseLost):
            a.result(30)  # its transaction committed; its Redis commit is refused
        b_go.set()
        row = b.result(30)
    assert ledger(engine, "o11") == [(row, 11)]


def test_a_stale_transaction_under_another_step_name_is_refused_too(
    app: Any, engine: sqlalchemy.engine.Engine
) -> None:
    inside, leave = threading.Event(), threading.Event()
    runs: list[Any] = []

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def held(self: Any, order_id: str) -> None:
        runs.append(self.idempotency)
        inside.set()
        leave.wait(30)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: held.apply(("o4",)).get(disable_sync_subtasks=False))
        assert inside.wait(30)
        run = runs[0]
        # A later run of the key (a higher fence) has written a step meanwhile.
        with engine.begin() as conn:
            for statement in SCHEMA.split(";"):
                conn.exec_driver_sql(statement)
            conn.execute(
                text(
                    "INSERT INTO celery_idem_steps "
                    "(record_key, name, fence, digest, ctype, cenc, value, expires_at) "
                    "VALUES (:key, 'first', :fence, '', 'application/json', 'utf-8', '1', 0)"
                ),
                {"key": run.key, "fence": run.fence + 1},
            )
        try:
            with pytest.raises(FenceRefused):
                run.transaction(add_ledger_row, "o4", 1, name="second")
        finally:
            leave.set()
    assert ledger(engine, "o4") == []


def test_the_step_table_is_written_in_the_users_transaction(
    app: Any, engine: sqlalchemy.engine.Engine
) -> None:
    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(add_ledger_row, order_id, 3, name="ledger")

    charge.delay("o5").get(disable_sync_subtasks=False)
    with engine.connect() as conn:
        steps = conn.execute(text("SELECT record_key, name, xmin::text FROM celery_idem_steps")).all()
        writers = conn.execute(text("SELECT xmin::text FROM ledger WHERE order_id = 'o5'")).scalars().all()
    assert [(key, name) for key, name, _ in steps] == [(charge.record_key_for(("o5",)), "ledger")]
    # The same PostgreSQL transaction wrote the ledger row and the step's row.
    assert writers == [steps[0][2]]


def test_postgresql_unreachable_mid_run_follows_the_backend_error_policy(
    redis_url: str, pg_schema: str
) -> None:
    proxy = Proxy("127.0.0.1", 5432)
    engine = postgres_engine(pg_schema, proxy.port, connect_timeout=2)
    try:
        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": redis_url,
                "idempotency_database": engine,
            }
        )

        @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
        def charge(self: Any, order_id: str) -> int:
            return self.idempotency.transaction(add_ledger_row, order_id, 9)

        # A connection in the engine's pool when PostgreSQL goes away, then none.
        first = charge.delay("o6a").get(disable_sync_subtasks=False)
        proxy.cut()
        for order_id in ("o6", "o6"):
            with pytest.raises(DatabaseUnavailable):
                charge.delay(order_id).get(disable_sync_subtasks=False)
            # The key was freed: once the database is back, the next delivery runs.
            assert store_for(redis_url, {}).read(charge.record_key_for((order_id,))).state == "free"
        proxy.restore()
        row = charge.delay("o6").get(disable_sync_subtasks=False)
        assert ledger(engine, "o6") == [(row, 9)]
        assert ledger(engine, "o6a") == [(first, 9)]
    finally:
        reset_databases()
        engine.dispose()
        proxy.close()


def test_the_whole_body_in_one_transaction_is_replayed_after_a_crash(
    app: Any, engine: sqlalchemy.engine.Engine, raw: Any
) -> None:
    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_transaction=True,
    )
    def charge(self: Any, order_id: str) -> dict[str, Any]:
        assert isinstance(self.idempotency.connection, sqlalchemy.engine.Connection)
        row = add_ledger_row(self.idempotency.connection, order_id, 42)
        app.effects["bodies"] = app.effects.get("bodies", 0) + 1
        return {"row": row}

    first = charge.apply(("o7",), task_id="w1").get(disable_sync_subtasks=False)
    key = charge.record_key_for(("o7",))
    # The worker died after the database commit, before the Redis commit.
    raw.hset(key, mapping={"state": "free"})
    raw.hdel(key, "result", "ctype", "cenc")
    again = charge.apply(("o7",), task_id="w2").get(disable_sync_subtasks=False)
    assert again == first
    assert app.effects["bodies"] == 1
    assert ledger(engine, "o7") == [(first["row"], 42)]


def test_an_engine_in_autocommit_mode_is_refused_before_fn_runs(redis_url: str, pg_schema: str) -> None:
    engine = postgres_engine(pg_schema).execution_options(isolation_level="AUTOCOMMIT")
    try:
        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": redis_url,
                "idempotency_database": engine,
            }
        )

        def failing(conn: sqlalchemy.engine.Connection, order_id: str) -> int:
            add_ledger_row(conn, order_id, 1)
            raise Boom()  # in a transaction, the row would be rolled back

        @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
        def charge(self: Any, order_id: str) -> int:
            return self.idempotency.transaction(failing, order_id)

        # Each statement would commit on its own: the effect without its step row.
        with pytest.raises(ImproperlyConfigured, match="autocommit"):
            charge.delay("o14").get(disable_sync_subtasks=False)
        assert ledger(engine, "o14") == []
    finally:
        reset_databases()
        engine.dispose()


# -- SQLite ------------------------------------------------------------------------------


def test_a_transaction_on_sqlite_replays_after_a_crash_before_the_commit(
    redis_url: str, tmp_path: Path
) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        Base.metadata.create_all(engine)
        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": redis_url,
                "idempotency_database": engine,
            }
        )
        bodies: list[int] = []

        @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
        def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
            row = self.idempotency.transaction(add_ledger_row_with_a_session, order_id, cents)
            bodies.append(row)
            if len(bodies) == 1:
                raise Boom()  # the worker died after the transaction, before the commit
            return {"row": row}

        result = attempts(charge, "o8", 800)
        rows = ledger(engine, "o8")
        assert [cents for _, cents in rows] == [800]
        assert result == {"row": rows[0][0]} and len(bodies) == 2
    finally:
        reset_databases()
        engine.dispose()


def test_a_transaction_inside_the_whole_body_is_part_of_its_transaction(
    app: Any, engine: sqlalchemy.engine.Engine
) -> None:
    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_transaction=True,
    )
    def transfer(self: Any, order_id: str, fail: bool) -> list[int]:
        debit = add_ledger_row(self.idempotency.connection, order_id, -5)
        credit = self.idempotency.transaction(add_ledger_row, order_id, 5, name="credit")
        if fail:
            raise Boom()  # the body fails: nothing of it may stay, the credit included
        return [debit, credit]

    with pytest.raises(Boom):
        transfer.apply(("o9", True))
    assert ledger(engine, "o9") == []
    rows = transfer.apply(("o9", False)).get(disable_sync_subtasks=False)
    assert ledger(engine, "o9") == [(rows[0], -5), (rows[1], 5)]


def test_a_connection_or_a_session_instead_of_an_engine_is_refused_when_the_task_is_bound(
    redis_url: str, engine: sqlalchemy.engine.Engine
) -> None:
    with engine.connect() as conn, Session(bind=engine) as session:
        for given in (conn, session):
            app = make_app({"broker_url": "memory://", "idempotency_redis_url": redis_url})
            app.conf.idempotency_database = given

            @app.task(base=IdempotentTask, shared=False)
            def charge() -> None:
                pass

            with pytest.raises(ImproperlyConfigured, match="must be a SQLAlchemy Engine") as refused:
                app.finalize()
            assert type(given).__name__ in str(refused.value)


# -- a real worker -----------------------------------------------------------------------


def test_pool_processes_do_not_share_the_connections_the_main_process_pooled(
    start_worker: Any,
    producer: Any,
    worker_conf: dict[str, Any],
    pg_schema: str,
    engine: sqlalchemy.engine.Engine,
) -> None:
    # The worker's main process used the Engine at import (tests/sqlalchemy_worker_app.py):
    # two pool processes checking out the connection it left in the pool would talk
    # over one socket, and read each other's replies.
    start_worker(
        worker_conf,
        concurrency=2,
        app="tests.sqlalchemy_worker_app",
        env={"IDEM_SQLALCHEMY_SCHEMA": pg_schema},
    )
    app = producer()
    results = [app.send_task("sa.charge", (f"p{i}", i)) for i in range(40)]
    rows = [result.get(timeout=60) for result in results]
    assert [ledger(engine, f"p{i}") for i in range(40)] == [[(row, i)] for i, row in enumerate(rows)]
