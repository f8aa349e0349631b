"""Effects made once: fenced transactions in PostgreSQL and steps in Redis.

Eager runs against a real Redis and a real PostgreSQL (each test has a schema of its
own, with a ledger table without unique constraints, so a duplicated effect shows as
a row). Crashes are made by the bodies (an exception after the effect) and takeovers
by a second run taking over a lease that was let run out; the worker-level crash
storms are in ``test_effects_chaos.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from celery_idem import IdempotentTask
from celery_idem.effects import SCHEMA
from celery_idem.errors import (
    DatabaseUnavailable,
    DuplicateStepName,
    FenceRefused,
    IdempotencyKeyError,
    LeaseLost,
    StepMismatch,
)
from celery_idem.lease import renewer
from celery_idem.store import Acquired, store_for
from tests.conftest import POSTGRES_URL, schema_url
from tests.helpers import ROOT, Boom, Proxy, attempts, lease_ended
from tests.worker_app import make_app


class Declined(Exception):
    pass


def add_ledger_row(conn: psycopg.Connection[Any], order_id: str, cents: int) -> int:
    row = conn.execute(
        "INSERT INTO ledger (order_id, cents) VALUES (%s, %s) RETURNING id", (order_id, cents)
    ).fetchone()
    assert row is not None
    return int(row[0])


def ledger(url: str, order_id: str) -> list[tuple[int, int]]:
    with psycopg.connect(url) as conn:
        return [
            tuple(r)
            for r in conn.execute("SELECT id, cents FROM ledger WHERE order_id = %s ORDER BY id", (order_id,))
        ]


@pytest.fixture
def app(redis_url: str, pg_url: str) -> Any:
    app = make_app(
        {
            "broker_url": "memory://",
            "task_always_eager": True,
            "task_eager_propagates": True,
            "idempotency_redis_url": redis_url,
            "test_events_url": redis_url,
            "idempotency_database_url": pg_url,
            "idempotency_cache_errors": (Declined,),
        }
    )
    app.effects: dict[str, int] = {}
    return app


def counted(app: Any, name: str) -> Any:
    """A function that counts its calls in ``app.effects[name]`` and returns a fresh value."""

    def effect(*args: Any, **kwargs: Any) -> str:
        app.effects[name] = app.effects.get(name, 0) + 1
        return f"{name}-{uuid.uuid4().hex[:8]}"

    effect.__qualname__ = name
    return effect


# -- the fence -----------------------------------------------------------------------


def test_the_fence_grows_across_runs_and_across_a_record_made_again(app: Any, raw: Any) -> None:
    fences = []

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str, fail: bool) -> int:
        fences.append(self.idempotency.fence)
        if fail:
            raise Boom()
        return self.idempotency.fence

    with pytest.raises(Boom):
        charge.apply(("o1", True))
    charge.apply(("o1", False))
    raw.delete(charge.record_key_for(("o1", False)))  # the record expired
    charge.apply(("o1", False))
    assert fences == sorted(fences) and len(set(fences)) == 3
    # A token alone would restart: the record made again starts at token 1.
    assert int(raw.hget(charge.record_key_for(("o1", False)), "token")) == 1


# -- transactions --------------------------------------------------------------------


def test_a_transaction_replays_after_a_crash_before_the_commit(app: Any, pg_url: str) -> None:
    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
        row = self.idempotency.transaction(add_ledger_row, order_id, cents)
        app.effects["attempts"] = app.effects.get("attempts", 0) + 1
        if app.effects["attempts"] == 1:
            raise Boom()  # the worker died after the transaction, before the commit
        return {"row": row}

    result = attempts(charge, "o1", 500)
    rows = ledger(pg_url, "o1")
    assert [cents for _, cents in rows] == [500]
    assert result == {"row": rows[0][0]}


def test_a_transaction_that_raises_rolls_back_and_runs_again(app: Any, pg_url: str) -> None:
    def failing_once(conn: Any, order_id: str) -> int:
        row = add_ledger_row(conn, order_id, 1)
        app.effects["calls"] = app.effects.get("calls", 0) + 1
        if app.effects["calls"] == 1:
            raise Boom()  # inside the transaction: its writes are rolled back
        return row

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(failing_once, order_id)

    row = attempts(charge, "o2")
    assert ledger(pg_url, "o2") == [(row, 1)]
    assert app.effects["calls"] == 2


def test_a_run_taken_over_cannot_commit_its_transaction(app: Any, pg_url: str, redis_url: str) -> None:
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
    assert ledger(pg_url, "o3") == [(winner["row"], 700)]


def test_two_runs_racing_in_one_transaction_make_one_effect_and_return_its_value(
    app: Any, pg_url: str, redis_url: str
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
    assert ledger(pg_url, "o11") == [(row, 11)]


def test_a_stale_transaction_under_another_step_name_is_refused_too(app: Any, pg_url: str) -> None:
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
        with psycopg.connect(pg_url, autocommit=True) as conn:
            for statement in SCHEMA.split(";"):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO celery_idem_steps (record_key, name, fence, digest, ctype, cenc, value, expires_at) "
                "VALUES (%s, 'first', %s, '', 'application/json', 'utf-8', '1', 0)",
                (run.key, run.fence + 1),
            )
        try:
            with pytest.raises(FenceRefused):
                run.transaction(add_ledger_row, "o4", 1, name="second")
        finally:
            leave.set()
    assert ledger(pg_url, "o4") == []


def test_the_step_table_is_written_in_the_users_transaction(app: Any, pg_url: str) -> None:
    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(add_ledger_row, order_id, 3, name="ledger")

    charge.delay("o5").get(disable_sync_subtasks=False)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT record_key, name, fence FROM celery_idem_steps").fetchall()
    assert [(key, name) for key, name, _ in rows] == [(charge.record_key_for(("o5",)), "ledger")]


def test_postgresql_unreachable_mid_run_follows_the_backend_error_policy(
    app: Any, pg_schema: str, redis_url: str
) -> None:
    proxy = Proxy("127.0.0.1", 5432)
    try:
        url = schema_url(pg_schema, POSTGRES_URL.replace(":5432", f":{proxy.port}"))
        calls = []

        def effect(conn: Any, order_id: str) -> int:
            calls.append(order_id)
            return add_ledger_row(conn, order_id, 9)

        @app.task(
            base=IdempotentTask,
            bind=True,
            shared=False,
            idempotency_key=("order_id",),
            idempotency_database_url=url,
            idempotency_database_options={"connect_timeout": 2},
        )
        def charge(self: Any, order_id: str) -> int:
            return self.idempotency.transaction(effect, order_id)

        proxy.cut()
        with pytest.raises(DatabaseUnavailable):
            charge.delay("o6").get(disable_sync_subtasks=False)
        # The key was freed: once the database is back, the next delivery runs.
        assert store_for(redis_url, {}).read(charge.record_key_for(("o6",))).state == "free"
        proxy.restore()
        row = charge.delay("o6").get(disable_sync_subtasks=False)
        assert ledger(schema_url(pg_schema), "o6") == [(row, 9)]
    finally:
        proxy.close()


def test_the_whole_body_in_one_transaction_is_replayed_after_a_crash(app: Any, pg_url: str, raw: Any) -> None:
    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_transaction=True,
    )
    def charge(self: Any, order_id: str) -> dict[str, Any]:
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
    assert ledger(pg_url, "o7") == [(first["row"], 42)]


def test_a_transaction_inside_the_whole_body_is_part_of_its_transaction(app: Any, pg_url: str) -> None:
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
        transfer.apply(("o10", True))
    assert ledger(pg_url, "o10") == []
    rows = transfer.apply(("o10", False)).get(disable_sync_subtasks=False)
    assert ledger(pg_url, "o10") == [(rows[0], -5), (rows[1], 5)]


ONLY_PSYCOPG = """
import json, sys
from celery_idem import IdempotentTask
from celery_idem.hooks import reset_after_fork
from tests.worker_app import make_app

app = make_app({"broker_url": "memory://", "task_always_eager": True, "task_eager_propagates": True,
                "idempotency_redis_url": sys.argv[1], "idempotency_database_url": sys.argv[2]})

@app.task(base=IdempotentTask, bind=True, shared=False)
def one(self):
    return self.idempotency.transaction(lambda conn: conn.execute("SELECT 1").fetchone()[0], name="one")

assert one.delay().get() == 1
reset_after_fork()  # what a new pool process runs
# kombu.utils.json imports django.utils.functional whenever Django is installed: look
# for Django's ORM, and for our adapters.
heavy = {"sqlalchemy", "django.db", "celery_idem.contrib.sqlalchemy", "celery_idem.contrib.django"}
print(json.dumps(sorted(heavy & set(sys.modules))))
"""


def test_the_psycopg_path_imports_neither_sqlalchemy_nor_django(redis_url: str, pg_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", ONLY_PSYCOPG, redis_url, pg_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


# -- steps -----------------------------------------------------------------------------


def test_a_takeover_replays_finished_steps_and_runs_the_rest(app: Any) -> None:
    receipt, notify = counted(app, "receipt"), counted(app, "notify")

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def checkout(self: Any, order_id: str) -> dict[str, Any]:
        first = self.idempotency.step(receipt, order_id)
        if app.effects["receipt"] == 1 and "crashed" not in app.effects:
            app.effects["crashed"] = 1
            raise Boom()
        second = self.idempotency.step(notify, order_id)
        return {"receipt": first, "notify": second}

    result = attempts(checkout, "o8")
    assert app.effects["receipt"] == 1 and app.effects["notify"] == 1
    assert result["receipt"].startswith("receipt-")


def test_a_step_called_with_other_arguments_raises_step_mismatch(app: Any) -> None:
    effect = counted(app, "effect")

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def job(self: Any, order_id: str, amount: int) -> str:
        value = self.idempotency.step(effect, order_id, amount)
        if amount == 1:
            raise Boom()
        return value

    with pytest.raises(Boom):
        job.apply(("o9", 1))
    with pytest.raises(StepMismatch, match="other arguments"):
        job.apply(("o9", 2))
    assert app.effects["effect"] == 1


def test_two_steps_of_one_name_in_a_run_need_names_of_their_own(app: Any) -> None:
    effect = counted(app, "effect")

    @app.task(base=IdempotentTask, bind=True, shared=False)
    def twice(self: Any) -> list[str]:
        return [self.idempotency.step(effect, 1), self.idempotency.step(effect, 2)]

    @app.task(base=IdempotentTask, bind=True, shared=False)
    def named(self: Any) -> list[str]:
        return [self.idempotency.step(effect, 1, name="a"), self.idempotency.step(effect, 2, name="b")]

    with pytest.raises(DuplicateStepName, match="pass name="):
        twice.delay().get(disable_sync_subtasks=False)
    assert len(set(named.delay().get(disable_sync_subtasks=False))) == 2


def test_a_failing_step_runs_again_unless_its_error_is_cached(app: Any) -> None:
    calls: dict[str, int] = {}

    def flaky(kind: str) -> str:
        calls[kind] = calls.get(kind, 0) + 1
        if calls[kind] == 1:
            raise Declined(kind) if kind == "cached" else Boom(kind)
        return kind

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("kind",))
    def job(self: Any, kind: str, attempt: int) -> str:
        try:
            return self.idempotency.step(flaky, kind)
        except Declined:
            raise Boom() from None  # the run goes on failing: the step's failure is stored

    assert attempts(job, "plain", 0) == "plain" and calls["plain"] == 2
    with pytest.raises(AssertionError):
        attempts(job, "cached", 0)
    assert calls["cached"] == 1


def test_a_run_that_lost_its_lease_cannot_store_a_step(app: Any, redis_url: str) -> None:
    effect = counted(app, "effect")
    store = store_for(redis_url, {})

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_lock_ttl=0.2)
    def job(self: Any) -> str:
        renewer().drop(self.idempotency.lease)  # as if the process were frozen
        lease_ended(store.client, self.idempotency.key)
        assert isinstance(store.acquire(self.idempotency.key, "intruder", 10_000, 10_000), Acquired)
        return self.idempotency.step(effect)

    with pytest.raises(LeaseLost):
        job.delay().get(disable_sync_subtasks=False)
    assert app.effects["effect"] == 1  # it ran (the run could not know), but nothing was stored


def test_steps_need_arguments_with_a_canonical_encoding(app: Any) -> None:
    @app.task(base=IdempotentTask, bind=True, shared=False)
    def job(self: Any) -> str:
        return self.idempotency.step(str, object())

    with pytest.raises(IdempotencyKeyError, match="digest of its arguments"):
        job.delay().get(disable_sync_subtasks=False)


def test_a_step_costs_one_round_trip_when_it_runs_and_none_when_replayed(app: Any, redis_url: str) -> None:
    from redis.connection import Connection

    sent: list[str] = []

    class Counting(Connection):
        # Every request is written by send_packed_command (the store packs its own).
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            data = command if isinstance(command, bytes) else b"".join(command)
            # each EVALSHA a round trip (a new connection's handshake aside)
            sent.extend(sha.decode() for sha in re.findall(rb"\$7\r\nEVALSHA\r\n\$40\r\n(\w{40})", data))
            super().send_packed_command(command, check_health)

    from celery_idem.store import _ACQUIRE, _COMMIT, _RELEASE, _STEP

    names = {_ACQUIRE.sha: "acquire", _COMMIT.sha: "commit", _RELEASE.sha: "release", _STEP.sha: "step"}
    effect = counted(app, "effect")

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_redis_options={"connection_class": Counting},
    )
    def job(self: Any, order_id: str) -> str:
        value = self.idempotency.step(effect, order_id)
        if app.effects["effect"] == 1 and "failed" not in app.effects:
            app.effects["failed"] = 1
            raise Boom()
        return value

    app.effects["failed"] = 1
    job.delay("warm-up").get(disable_sync_subtasks=False)  # connected, scripts loaded
    del app.effects["failed"], app.effects["effect"]
    sent.clear()
    with pytest.raises(Boom):
        job.delay("o10").get(disable_sync_subtasks=False)
    first = [names.get(name, name) for name in sent]
    sent.clear()
    job.delay("o10").get(disable_sync_subtasks=False)
    second = [names.get(name, name) for name in sent]
    assert first == ["acquire", "step", "release"]
    assert second == ["acquire", "commit"]  # the step replayed from the acquire's reply
    assert app.effects["effect"] == 1
