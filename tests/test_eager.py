"""Eager mode (``task_always_eager`` and ``.apply()``) has the worker's semantics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from celery import states

from celery_idem.errors import (
    BackendUnavailable,
    DuplicateTaskInProgress,
    ResultNotSerializable,
    ResultTooLarge,
)
from celery_idem.testing import RedisServer
from tests.helpers import next_report, runs
from tests.worker_app import Cached, make_app


@pytest.fixture
def eager(redis_url):
    def build(**conf):
        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": redis_url,
                "test_events_url": redis_url,
                **conf,
            }
        )
        return app

    return build


def test_equal_calls_run_once_and_duplicates_get_the_first_result(eager, events):
    app = eager()
    first = value(app.tasks["t.by_args"].delay("x"))
    second = value(app.tasks["t.by_args"].apply_async(("x",), {"hold": None}))
    assert second == first
    assert runs(events, "x") == 1


def test_apply_with_same_task_id_returns_cached_result(eager, events):
    app = eager(task_always_eager=False)
    task = app.tasks["t.by_id"]
    first = value(task.apply(("i",), task_id="one"))
    assert value(task.apply(("i",), task_id="one")) == first
    assert value(task.apply(("i",), task_id="two"))["run"] == 2
    assert runs(events, "i") == 2


def test_run_exposes_key_and_fencing_token(eager):
    app = eager()
    task = app.tasks["t.by_args"]
    report = value(task.delay("tok"))
    assert report["token"] == 1
    record = task_store(task).read(task.record_key_for(("tok",)))
    assert record.state == "done" and record.token == 1


def test_direct_call_runs_the_body_without_a_record(eager, events):
    app = eager()
    task = app.tasks["t.by_args"]
    assert task("direct")["token"] is None
    assert task("direct")["run"] == 2
    assert task_store(task).read(task.record_key_for(("direct",))) is None


def test_failure_releases_the_key_so_the_next_delivery_runs(eager, events):
    app = eager()
    task = app.tasks["t.by_label"]
    with pytest.raises(ValueError):
        task.delay("f", fail="error")
    record = task_store(task).read(task.record_key_for(("f",)))
    assert record.state == "free"
    assert value(task.delay("f"))["token"] == 2
    assert runs(events, "f") == 2


def test_cached_error_is_replayed_to_duplicates_without_running(eager, events):
    app = eager()
    task = app.tasks["t.cached_errors"]
    with pytest.raises(Cached):
        task.delay("c", fail="cached")
    with pytest.raises(Cached) as replayed:
        task.delay("c")
    assert replayed.value.args == ("c",)
    assert runs(events, "c") == 1


def test_self_retry_runs_again_and_records_the_retry_result(eager, events):
    # Celery itself raises Retry out of eager calls when eager errors propagate.
    app = eager(task_eager_propagates=False)
    result = value(app.tasks["t.by_label"].delay("r", fail="retry_once"))
    assert result["run"] == 2 and result["token"] == 2
    assert value(app.tasks["t.by_label"].delay("r")) == result
    assert runs(events, "r") == 2


def test_autoretry_for_keeps_working(eager, redis_url, events):
    app = eager(task_eager_propagates=False)
    attempts = []

    @app.task(
        base=type(app.tasks["t.by_id"]).__mro__[1],
        bind=True,
        shared=False,
        name="t.flaky",
        idempotency_key="args",
        autoretry_for=(ConnectionError,),
        retry_backoff=False,
        max_retries=3,
        default_retry_delay=0,
    )
    def flaky(self, label):
        attempts.append(self.idempotency.token)
        if len(attempts) < 3:
            raise ConnectionError("flaky")
        return len(attempts)

    assert value(flaky.delay("a")) == 3
    assert attempts == [1, 2, 3]
    assert value(flaky.delay("a")) == 3
    assert attempts == [1, 2, 3]


def test_oversize_result_is_recorded_as_failure_and_not_rerun(eager, events):
    app = eager(idempotency_max_result_bytes=10)
    task = app.tasks["t.by_label"]
    with pytest.raises(ResultTooLarge) as first:
        task.delay("big")
    assert first.value.limit == 10 and first.value.size > 10
    with pytest.raises(ResultTooLarge):
        task.delay("big")
    assert runs(events, "big") == 1


def test_unserialisable_result_is_recorded_as_failure_and_not_rerun(eager, events):
    app = eager()
    calls = []

    @app.task(base=type(app.tasks["t.by_id"]).__mro__[1], shared=False, name="t.odd", idempotency_key="args")
    def odd(label):
        calls.append(label)
        return object()

    with pytest.raises(ResultNotSerializable) as first:
        odd.delay("o")
    assert "json" in str(first.value)
    with pytest.raises(ResultNotSerializable):
        odd.delay("o")
    assert calls == ["o"]


def value(result):
    # Celery forbids result.get() while any eager task runs (a process-wide flag):
    # these tests run eager tasks in several threads on purpose.
    return result.get(disable_sync_subtasks=False)


def hold_in_thread(task, label, **options):
    """Start a run of ``task`` for ``label`` that holds the key until its gate opens."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(lambda: value(task.apply_async((label,), {"hold": "gate"}, **options)))
    pool.shutdown(wait=False)
    return future


@pytest.mark.parametrize("policy", ["wait", "retry"])
def test_wait_policy_blocks_until_the_holder_finishes_and_returns_its_result(eager, events, policy):
    # In eager mode there is no broker to re-queue to, so "retry" waits too.
    app = eager(idempotency_on_conflict=policy)
    task = app.tasks["t.by_label"]
    holder = hold_in_thread(task, "w")
    started = next_report(events, "started", "w")
    waiter = ThreadPoolExecutor(1).submit(lambda: value(task.delay("w")))
    events.rpush("gate:w", "open")
    assert waiter.result(30) == holder.result(30)
    assert waiter.result()["task_id"] == started["task_id"]
    assert runs(events, "w") == 1


def test_wait_policy_gives_up_after_wait_timeout(eager, events):
    app = eager(idempotency_on_conflict="wait", idempotency_wait_timeout=0.2)
    task = app.tasks["t.by_label"]
    holder = hold_in_thread(task, "wt")
    started = next_report(events, "started", "wt")
    with pytest.raises(DuplicateTaskInProgress) as busy:
        task.delay("wt")
    assert busy.value.holder == started["task_id"]
    events.rpush("gate:wt", "open")
    holder.result(30)
    assert runs(events, "wt") == 1


def test_raise_policy_raises_with_holder_and_lease_left(eager, events):
    app = eager(idempotency_on_conflict="raise")
    task = app.tasks["t.by_label"]
    holder = hold_in_thread(task, "x")
    started = next_report(events, "started", "x")
    with pytest.raises(DuplicateTaskInProgress) as busy:
        task.delay("x")
    assert busy.value.holder == started["task_id"]
    assert 0 < busy.value.lease_left <= 30
    events.rpush("gate:x", "open")
    holder.result(30)
    assert runs(events, "x") == 1


def test_drop_policy_ends_the_duplicate_as_ignored(eager, events):
    app = eager(idempotency_on_conflict="drop")
    task = app.tasks["t.by_label"]
    holder = hold_in_thread(task, "d")
    next_report(events, "started", "d")
    dropped = task.delay("d")
    assert dropped.state == states.IGNORED
    events.rpush("gate:d", "open")
    holder.result(30)
    assert runs(events, "d") == 1


@pytest.fixture
def lone_redis():
    with RedisServer() as server:
        yield server


def test_backend_error_raise_policy_fails_without_running(eager, events, lone_redis):
    app = eager(idempotency_redis_url=lone_redis.url, idempotency_on_backend_error="raise")
    lone_redis.stop()
    with pytest.raises(BackendUnavailable) as error:
        app.tasks["t.by_label"].delay("b")
    assert str(lone_redis.port) in str(error.value)
    assert runs(events, "b") == 0


def test_backend_error_run_policy_runs_unprotected(eager, events, lone_redis, caplog):
    app = eager(idempotency_redis_url=lone_redis.url, idempotency_on_backend_error="run")
    lone_redis.stop()
    assert value(app.tasks["t.by_label"].delay("u"))["token"] is None
    assert runs(events, "u") == 1
    assert "unprotected" in caplog.text


def test_backend_error_retry_policy_raises_in_eager_mode(eager, events, lone_redis):
    app = eager(idempotency_redis_url=lone_redis.url)
    lone_redis.stop()
    with pytest.raises(BackendUnavailable):
        app.tasks["t.by_label"].delay("e")
    assert runs(events, "e") == 0


def task_store(task):
    from celery_idem.store import store_for

    config = task.resolved_idempotency
    return store_for(config.redis_url, config.redis_options)


def test_threads_share_one_run(eager, events):
    app = eager(idempotency_on_conflict="wait")
    task = app.tasks["t.by_label"]
    barrier = threading.Barrier(8)

    def call():
        barrier.wait()
        return value(task.delay("t", hold=0.2))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: call(), range(8)))
    assert all(r == results[0] for r in results)
    assert runs(events, "t") == 1


def test_replays_and_conflicts_are_signalled(eager, events):
    from celery_idem import signals

    app = eager(idempotency_on_conflict="raise")
    task = app.tasks["t.by_label"]
    seen = []

    def on_replay(sender, key, token, failed, **kwargs):
        seen.append(("replayed", sender.name, token, failed))

    def on_conflict(sender, key, holder, policy, **kwargs):
        seen.append(("conflict", sender.name, policy))

    signals.task_replayed.connect(on_replay)
    signals.task_conflict.connect(on_conflict)
    try:
        holder = hold_in_thread(task, "sg")
        next_report(events, "started", "sg")
        with pytest.raises(DuplicateTaskInProgress):
            task.delay("sg")
        events.rpush("gate:sg", "open")
        holder.result(30)
        value(task.delay("sg"))
    finally:
        signals.task_replayed.disconnect(on_replay)
        signals.task_conflict.disconnect(on_conflict)
    assert seen == [("conflict", "t.by_label", "raise"), ("replayed", "t.by_label", 1, False)]


def _hold_then_report_lost(redis_url):
    import json

    from celery_idem import signals
    from tests.worker_app import events as events_client

    client = events_client(redis_url)
    signals.lease_lost.connect(
        lambda sender, key, token, **kw: client.rpush("lost:ls", json.dumps(token)), weak=False
    )
    app = make_app(
        {
            "broker_url": "memory://",
            "task_always_eager": True,
            "idempotency_redis_url": redis_url,
            "idempotency_lock_ttl": 0.3,
        }
    )
    app.tasks["t.by_label"].delay("ls", hold="gate")


def test_a_stalled_holder_is_taken_over_and_its_commit_is_refused(redis_url, events):
    import json
    import multiprocessing
    import os
    import signal

    from celery_idem import signals

    taken = []
    signals.lease_taken_over.connect(lambda sender, key, token, **kw: taken.append(token), weak=False)
    stalled = multiprocessing.get_context("fork").Process(target=_hold_then_report_lost, args=(redis_url,))
    stalled.start()
    try:
        first = next_report(events, "started", "ls")
        os.kill(stalled.pid, signal.SIGSTOP)  # no renewals from here on
        app = make_app(
            {
                "broker_url": "memory://",
                "task_always_eager": True,
                "task_eager_propagates": True,
                "idempotency_redis_url": redis_url,
                "idempotency_lock_ttl": 0.3,
                "idempotency_on_conflict": "wait",
            }
        )
        winner = value(app.tasks["t.by_label"].delay("ls"))
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert winner["token"] == first["token"] + 1 and taken[-1] == winner["token"]
    events.rpush("gate:ls", "open")
    assert json.loads(events.blpop(["lost:ls"], timeout=30)[1]) == first["token"]
    stalled.join(30)
    assert runs(events, "ls") == 2


def test_pool_process_start_gives_fresh_connections_and_renewer(redis_url):
    from celery import signals as celery_signals

    from celery_idem.lease import renewer
    from celery_idem.store import store_for

    store, keeper = store_for(redis_url, {}), renewer()
    celery_signals.worker_process_init.send(sender="test")
    assert store_for(redis_url, {}) is not store
    assert renewer() is not keeper


@pytest.mark.parametrize("kind", ["async", "group", "chain"])
def test_a_result_object_is_recorded_in_its_tuple_form(eager, events, kind):
    from celery.result import ResultBase, result_from_tuple

    app = eager(task_always_eager=False)
    task = app.tasks["t.spawn"]
    app.conf.task_always_eager = True  # the spawned tasks run eagerly too
    first = task.apply((f"e-{kind}", kind), task_id=f"eager-{kind}")
    assert first.state == states.SUCCESS
    spawned = value(first)
    assert isinstance(spawned, ResultBase)
    duplicate = value(task.apply((f"e-{kind}", kind), task_id=f"eager-{kind}"))
    assert runs(events, f"e-{kind}") == 1
    assert result_from_tuple(duplicate, app).id == spawned.id
