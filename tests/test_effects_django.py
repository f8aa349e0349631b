"""Fenced transactions through Django's ORM: the psycopg cases, on a real Django project.

The project is ``tests/django_project`` (``celery_idem.contrib.django`` and a ``ledger``
app, on PostgreSQL with the test's own schema as search path), migrated for real, so
the step table is the one our migration makes. Django is never set up in the pytest
process: each scenario below (the functions not named ``test_``) runs in a process of
its own through ``tests/django_project/runner.py``, and its test checks the database
from outside. ``fn`` gets no connection: it runs inside ``transaction.atomic`` and
uses the ORM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from celery_idem import IdempotentTask
from celery_idem.effects import SCHEMA
from celery_idem.errors import DatabaseUnavailable, FenceRefused, LeaseLost
from celery_idem.lease import renewer
from celery_idem.store import store_for
from tests.conftest import POSTGRES_URL, schema_url
from tests.django_project.runner import RESULT, Context
from tests.helpers import ROOT, Boom, attempts, lease_ended

MANAGE = str(ROOT / "tests" / "django_project" / "manage.py")


@pytest.fixture
def other_schema(pg_schema: str) -> Iterator[str]:
    """A second schema of the test's own: the ``other`` alias of the project."""
    schema = f"idem_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
    yield schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def django_env(pg_schema: str, redis_url: str) -> dict[str, str]:
    """The environment of the project's processes: its database is this test's schema."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDEM_", "DJANGO_"))}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.django_project.settings",
        "IDEM_DJANGO_SCHEMA": pg_schema,
        "IDEM_DJANGO_CONTEXT": json.dumps({"redis_url": redis_url}),
    }


@pytest.fixture
def in_django(django_env: dict[str, str]) -> Callable[..., Any]:
    """Run a scenario of this module in a Django process; return what it returned."""

    def run(scenario: Callable[[Context], Any], env: dict[str, str] | None = None, **context: Any) -> Any:
        environment = {**django_env, **(env or {})}
        environment["IDEM_DJANGO_CONTEXT"] = json.dumps(
            {**json.loads(environment["IDEM_DJANGO_CONTEXT"]), **context}
        )
        done = subprocess.run(
            [sys.executable, "-m", "tests.django_project.runner", f"{__name__}:{scenario.__name__}"],
            env=environment,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"scenario {scenario.__name__} failed:\n{done.stdout}\n{done.stderr}"
        return json.loads(done.stdout.splitlines()[-1].removeprefix(RESULT))

    return run


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, MANAGE, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def ledger(schema: str, order_id: str) -> list[tuple[int, int]]:
    with psycopg.connect(schema_url(schema)) as conn:
        rows = conn.execute(
            "SELECT id, cents FROM ledger_ledger WHERE order_id = %s ORDER BY id", (order_id,)
        ).fetchall()
    return [(int(i), int(c)) for i, c in rows]


def steps(schema: str) -> list[tuple[str, str, int, str]]:
    with psycopg.connect(schema_url(schema)) as conn:
        rows = conn.execute(
            "SELECT record_key, name, expires_at, xmin::text FROM celery_idem_steps"
        ).fetchall()
    return [(str(k), str(n), int(e), str(x)) for k, n, e, x in rows]


# -- what the scenarios' transactions do (in the Django process) -----------------------


def add_ledger_row(order_id: str, cents: int, using: str = "default") -> int:
    from tests.django_project.ledger.models import Ledger

    return int(Ledger.objects.using(using).create(order_id=order_id, cents=cents).id)


def add_ledger_row_in_its_own_atomic_block(order_id: str, cents: int) -> int:
    """The body's own ``transaction.atomic`` inside fn: a savepoint of celery_idem's."""
    from django.db import transaction

    with transaction.atomic():
        return add_ledger_row(order_id, cents)


# -- transactions --------------------------------------------------------------------


def replays_after_a_crash(ctx: Context) -> dict[str, Any]:
    app = ctx.app()

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
        row = self.idempotency.transaction(add_ledger_row_in_its_own_atomic_block, order_id, cents)
        app.effects["attempts"] = app.effects.get("attempts", 0) + 1
        if app.effects["attempts"] == 1:
            raise Boom()  # the worker died after the transaction, before the commit
        return {"row": row}

    result: dict[str, Any] = attempts(charge, "o1", 500)
    assert app.effects["attempts"] == 2
    # Each adapter imports its own library only.
    assert not {"sqlalchemy", "celery_idem.contrib.sqlalchemy", "celery_idem.contrib.postgres"} & set(
        sys.modules
    )
    return result


def test_a_transaction_replays_after_a_crash_before_the_commit(in_django: Any, pg_schema: str) -> None:
    result = in_django(replays_after_a_crash)
    assert ledger(pg_schema, "o1") == [(result["row"], 500)]


def rolls_back_and_runs_again(ctx: Context) -> int:
    app = ctx.app()

    def failing_once(order_id: str) -> int:
        row = add_ledger_row(order_id, 1)
        app.effects["calls"] = app.effects.get("calls", 0) + 1
        if app.effects["calls"] == 1:
            raise Boom()  # inside the transaction: its writes are rolled back
        return row

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(failing_once, order_id)

    row: int = attempts(charge, "o2")
    assert app.effects["calls"] == 2
    return row


def test_a_transaction_that_raises_rolls_back_and_runs_again(in_django: Any, pg_schema: str) -> None:
    row = in_django(rolls_back_and_runs_again)
    assert ledger(pg_schema, "o2") == [(row, 1)]


def taken_over_run_commits_nothing(ctx: Context) -> dict[str, Any]:
    # Run A holds the key and stops (its lease runs out); run B takes over and
    # commits the transaction; A wakes up and tries the same transaction.
    app = ctx.app()
    gate, started = threading.Event(), threading.Event()
    store = store_for(ctx.redis_url, {})

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
        winner: dict[str, Any] = charge.apply(("o3", False), task_id="b").get(disable_sync_subtasks=False)
        gate.set()
        with pytest.raises(FenceRefused) as refused:
            zombie.result(30)
    assert refused.value.current_fence == winner["fence"] > refused.value.fence
    return winner


def test_a_run_taken_over_cannot_commit_its_transaction(in_django: Any, pg_schema: str) -> None:
    winner = in_django(taken_over_run_commits_nothing)
    assert ledger(pg_schema, "o3") == [(winner["row"], 700)]


def racing_runs_make_one_effect(ctx: Context) -> int:
    # A is taken over while frozen; B, the new run, is inside fn when A wakes up
    # and commits the same transaction first. B's write of the step conflicts:
    # B's transaction rolls back and B returns what A's committed.
    app = ctx.app()
    a_frozen, a_go, b_inside, b_go = (threading.Event() for _ in range(4))
    store = store_for(ctx.redis_url, {})
    current = threading.local()

    def effect(order_id: str) -> int:
        if current.run == "b":
            b_inside.set()
            b_go.wait(30)
        return add_ledger_row(order_id, 11)

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
        row: int = b.result(30)
    return row


def test_two_runs_racing_in_one_transaction_make_one_effect_and_return_its_value(
    in_django: Any, pg_schema: str
) -> None:
    row = in_django(racing_runs_make_one_effect)
    assert ledger(pg_schema, "o11") == [(row, 11)]


def stale_run_refused_under_another_name(ctx: Context) -> None:
    from django.db import connection

    app = ctx.app()
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
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO celery_idem_steps (record_key, name, fence, digest, ctype, cenc, value, expires_at) "
                "VALUES (%s, 'first', %s, '', 'application/json', 'utf-8', '1', 0)",
                (run.key, run.fence + 1),
            )
        try:
            with pytest.raises(FenceRefused):
                run.transaction(add_ledger_row, "o4", 1, name="second")
        finally:
            leave.set()


def test_a_stale_transaction_under_another_step_name_is_refused_too(in_django: Any, pg_schema: str) -> None:
    in_django(stale_run_refused_under_another_name)
    assert ledger(pg_schema, "o4") == []


def one_named_transaction(ctx: Context) -> str:
    app = ctx.app()

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(add_ledger_row, order_id, 3, name="ledger")

    charge.delay("o5").get(disable_sync_subtasks=False)
    return str(charge.record_key_for(("o5",)))


def test_the_step_table_is_written_in_the_users_transaction(in_django: Any, pg_schema: str) -> None:
    key = in_django(one_named_transaction)
    written = steps(pg_schema)
    assert [(k, name) for k, name, _, _ in written] == [(key, "ledger")]
    with psycopg.connect(schema_url(pg_schema)) as conn:
        writers = [r[0] for r in conn.execute("SELECT xmin::text FROM ledger_ledger WHERE order_id = 'o5'")]
    # The same PostgreSQL transaction wrote the ledger row and the step's row.
    assert writers == [written[0][3]]


def outage_frees_the_key(ctx: Context) -> int:
    app = ctx.app()

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        return self.idempotency.transaction(add_ledger_row, order_id, 9)

    # Django's connection is open when PostgreSQL goes away, then there is none.
    charge.delay("o6a").get(disable_sync_subtasks=False)
    ctx.proxy.cut()
    for _ in range(2):
        with pytest.raises(DatabaseUnavailable):
            charge.delay("o6").get(disable_sync_subtasks=False)
        # The key was freed: once the database is back, the next delivery runs.
        assert store_for(ctx.redis_url, {}).read(charge.record_key_for(("o6",))).state == "free"
    ctx.proxy.restore()
    row: int = charge.delay("o6").get(disable_sync_subtasks=False)
    return row


def test_postgresql_unreachable_mid_run_follows_the_backend_error_policy(
    in_django: Any, pg_schema: str
) -> None:
    row = in_django(outage_frees_the_key, proxy=True)
    assert ledger(pg_schema, "o6") == [(row, 9)]
    assert [cents for _, cents in ledger(pg_schema, "o6a")] == [9]


def whole_body_replayed(ctx: Context) -> dict[str, Any]:
    import redis

    app = ctx.app()

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_transaction=True,
    )
    def charge(self: Any, order_id: str) -> dict[str, Any]:
        assert self.idempotency.connection is None  # Django: the ORM, no connection argument
        row = add_ledger_row(order_id, 42)
        app.effects["bodies"] = app.effects.get("bodies", 0) + 1
        return {"row": row}

    first: dict[str, Any] = charge.apply(("o7",), task_id="w1").get(disable_sync_subtasks=False)
    key = charge.record_key_for(("o7",))
    # The worker died after the database commit, before the Redis commit.
    raw = redis.Redis.from_url(ctx.redis_url)
    raw.hset(key, mapping={"state": "free"})
    raw.hdel(key, "result", "ctype", "cenc")
    again = charge.apply(("o7",), task_id="w2").get(disable_sync_subtasks=False)
    assert again == first
    assert app.effects["bodies"] == 1
    return first


def test_the_whole_body_in_one_transaction_is_replayed_after_a_crash(in_django: Any, pg_schema: str) -> None:
    first = in_django(whole_body_replayed)
    assert ledger(pg_schema, "o7") == [(first["row"], 42)]


def transaction_inside_the_whole_body(ctx: Context) -> list[int]:
    app = ctx.app()

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        idempotency_key=("order_id",),
        idempotency_transaction=True,
    )
    def transfer(self: Any, order_id: str, fail: bool) -> list[int]:
        debit = add_ledger_row(order_id, -5)
        credit = self.idempotency.transaction(add_ledger_row, order_id, 5, name="credit")
        if fail:
            raise Boom()  # the body fails: nothing of it may stay, the credit included
        return [debit, credit]

    with pytest.raises(Boom):
        transfer.apply(("o10", True))
    from tests.django_project.ledger.models import Ledger

    assert not Ledger.objects.filter(order_id="o10").exists()
    rows: list[int] = transfer.apply(("o10", False)).get(disable_sync_subtasks=False)
    return rows


def test_a_transaction_inside_the_whole_body_is_part_of_its_transaction(
    in_django: Any, pg_schema: str
) -> None:
    debit, credit = in_django(transaction_inside_the_whole_body)
    assert ledger(pg_schema, "o10") == [(debit, -5), (credit, 5)]


def transaction_inside_the_bodys_atomic_block(ctx: Context) -> list[int]:
    from django.db import transaction

    app = ctx.app()

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def transfer(self: Any, order_id: str) -> list[int]:
        with transaction.atomic():
            debit = add_ledger_row(order_id, -5)
            credit = self.idempotency.transaction(add_ledger_row, order_id, 5, name="credit")
            return [debit, credit, add_ledger_row(order_id, 0)]

    rows: list[int] = transfer.delay("o11").get(disable_sync_subtasks=False)
    return rows


def test_a_transaction_inside_the_bodys_own_atomic_block_joins_it(in_django: Any, pg_schema: str) -> None:
    debit, credit, after = in_django(transaction_inside_the_bodys_atomic_block)
    assert ledger(pg_schema, "o11") == [(debit, -5), (credit, 5), (after, 0)]


def broken_connection_replaced(ctx: Context) -> int:
    from django.db import OperationalError

    from tests.django_project.ledger.models import Ledger

    app = ctx.app()

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str) -> int:
        Ledger.objects.count()  # the connection is open
        ctx.proxy.cut()
        with pytest.raises(OperationalError):
            Ledger.objects.count()  # the body's own query finds the database gone
        ctx.proxy.restore()
        return self.idempotency.transaction(add_ledger_row, order_id, 12)

    row: int = charge.delay("o12").get(disable_sync_subtasks=False)
    return row


def test_a_connection_broken_before_the_transaction_is_replaced(in_django: Any, pg_schema: str) -> None:
    row = in_django(broken_connection_replaced, proxy=True)
    assert ledger(pg_schema, "o12") == [(row, 12)]


# -- another alias, the migration, the purge command ------------------------------------


def replays_on_another_alias(ctx: Context) -> dict[str, Any]:
    from django.db import transaction

    app = ctx.app(idempotency_database="django:other")

    def add_row_on_other(order_id: str, cents: int) -> int:
        # fn runs inside transaction.atomic(using="other"): its own block is a savepoint.
        assert transaction.get_connection("other").in_atomic_block
        assert not transaction.get_connection("default").in_atomic_block
        return add_ledger_row(order_id, cents, using="other")

    @app.task(base=IdempotentTask, bind=True, shared=False, idempotency_key=("order_id",))
    def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
        row = self.idempotency.transaction(add_row_on_other, order_id, cents)
        app.effects["attempts"] = app.effects.get("attempts", 0) + 1
        if app.effects["attempts"] == 1:
            raise Boom()  # the worker died after the transaction, before the commit
        return {"row": row, "key": self.idempotency.key}

    result: dict[str, Any] = attempts(charge, "o13", 130)
    return result


def test_a_transaction_on_another_database_alias_replays_there(
    in_django: Any, pg_schema: str, other_schema: str
) -> None:
    result = in_django(replays_on_another_alias, env={"IDEM_DJANGO_OTHER_SCHEMA": other_schema})
    assert ledger(other_schema, "o13") == [(result["row"], 130)]
    assert [(key, name) for key, name, _, _ in steps(other_schema)] == [
        (result["key"], f"{__name__}.replays_on_another_alias.<locals>.add_row_on_other")
    ]
    assert ledger(pg_schema, "o13") == [] and steps(pg_schema) == []


def test_the_migration_makes_the_table_the_step_sql_reads_and_writes(
    django_env: dict[str, str], pg_schema: str, other_schema: str
) -> None:
    assert "No changes detected" in manage(django_env, "makemigrations", "--check", "--dry-run").stdout
    manage(django_env, "migrate")
    with psycopg.connect(schema_url(other_schema), autocommit=True) as conn:
        for statement in SCHEMA.split(";"):
            conn.execute(statement)

    def columns(schema: str) -> set[tuple[str, str, str]]:
        with psycopg.connect(POSTGRES_URL) as conn:
            rows = conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'celery_idem_steps'",
                (schema,),
            ).fetchall()
        return {(str(n), str(t), str(null)) for n, t, null in rows}

    # Django's table is the SQL one plus its own surrogate key, with the
    # (record_key, name) key as a unique constraint: a second write conflicts.
    assert columns(pg_schema) == columns(other_schema) | {("id", "bigint", "NO")}
    with psycopg.connect(schema_url(pg_schema), autocommit=True) as conn:
        insert = (
            "INSERT INTO celery_idem_steps (record_key, name, fence, digest, ctype, cenc, value, expires_at) "
            "VALUES ('k', 'n', 1, '', 'application/json', 'utf-8', '1', 0)"
        )
        conn.execute(insert)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert)


def test_the_purge_command_deletes_expired_step_rows_and_keeps_the_others(
    django_env: dict[str, str], pg_schema: str, other_schema: str
) -> None:
    env = {**django_env, "IDEM_DJANGO_OTHER_SCHEMA": other_schema}
    manage(env, "migrate")
    manage(env, "migrate", "--database", "other")
    now_ms = int(time.time() * 1000)
    for schema in (pg_schema, other_schema):
        with psycopg.connect(schema_url(schema), autocommit=True) as conn:
            for name, expires_at in (("expired", now_ms - 1000), ("kept", now_ms + 3_600_000)):
                conn.execute(
                    "INSERT INTO celery_idem_steps "
                    "(record_key, name, fence, digest, ctype, cenc, value, expires_at) "
                    "VALUES ('k', %s, 1, '', 'application/json', 'utf-8', '1', %s)",
                    (name, expires_at),
                )
    done = manage(env, "celery_idem_purge_steps")
    assert done.stdout.strip() == "deleted 1 expired step row(s)"
    assert [name for _, name, _, _ in steps(pg_schema)] == ["kept"]
    assert sorted(name for _, name, _, _ in steps(other_schema)) == ["expired", "kept"]
    assert manage(env, "celery_idem_purge_steps", "--database", "other").stdout.strip() == (
        "deleted 1 expired step row(s)"
    )
    assert [name for _, name, _, _ in steps(other_schema)] == ["kept"]


# -- a real worker ---------------------------------------------------------------------


def test_a_pool_process_killed_after_its_transaction_committed_leaves_one_ledger_row(
    start_worker: Any,
    producer: Any,
    worker_conf: dict[str, Any],
    events: Any,
    django_env: dict[str, str],
    pg_schema: str,
) -> None:
    manage(django_env, "migrate")
    start_worker(
        worker_conf,
        app="tests.django_project.celery_app",
        env={name: django_env[name] for name in ("DJANGO_SETTINGS_MODULE", "IDEM_DJANGO_SCHEMA")},
    )
    app = producer()
    result = app.send_task("ledger.charge", ("o20", 700), task_id="charge-o20")
    item = events.blpop(["committed:o20"], timeout=60)
    assert item is not None, "the task never committed its transaction"
    committed = json.loads(item[1])
    # After the database commit, before the Redis commit: the message comes back,
    # the key is taken over, and the transaction is replayed, not run again.
    os.kill(committed["pid"], signal.SIGKILL)
    assert result.get(timeout=60) == {"row": committed["row"], "run": 2}
    # The same key sent again is served from the record.
    again = app.send_task("ledger.charge", ("o20", 700), task_id="charge-o20-again")
    assert again.get(timeout=60) == {"row": committed["row"], "run": 2}
    assert ledger(pg_schema, "o20") == [(committed["row"], 700)]
