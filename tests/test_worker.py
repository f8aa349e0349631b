"""Guarantees that involve the broker, proved against real worker processes.

Workers run ``tests.worker_app`` on a private Redis (broker db 1, results db 2,
records and reports db 0) with a 2 s lease unless a test says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import time

import kombu
import pytest
import redis
from celery import states

from celery_idem.errors import DuplicateTaskInProgress, LeaseLost
from celery_idem.store import store_for
from celery_idem.testing import RedisServer
from tests.helpers import await_change, await_record, next_report, outcome, runs
from tests.worker_app import Cached


def record_key(app, name, *args, task_id=None):
    return app.tasks[name].record_key_for(args, task_id=task_id)


def test_redelivered_message_after_commit_returns_cached_result(start_worker, producer, worker_conf, events):
    start_worker(worker_conf)
    app = producer()
    first = app.tasks["t.by_id"].apply_async(("a",), task_id="fixed-id")
    assert first.get(timeout=30)["run"] == 1
    again = app.tasks["t.by_id"].apply_async(("a",), task_id="fixed-id")
    assert again.get(timeout=30)["run"] == 1
    assert runs(events, "a") == 1


def test_resubmitted_arguments_return_the_first_result_as_their_own(
    start_worker, producer, worker_conf, events
):
    start_worker(worker_conf)
    app = producer()
    first = app.tasks["t.by_args"].delay("s").get(timeout=30)
    late = app.tasks["t.by_args"].delay("s")
    assert late.get(timeout=30) == first
    assert late.state == states.SUCCESS and late.id != first["task_id"]
    assert runs(events, "s") == 1


def test_killed_pool_child_is_taken_over_under_a_higher_token_and_runs_once(
    start_worker, producer, worker_conf, events
):
    start_worker(worker_conf, concurrency=2)
    app = producer()
    result = app.tasks["t.by_id"].apply_async(("k",), kwargs={"hold": "gate"})
    started = next_report(events, "started", "k")
    os.kill(started["pid"], signal.SIGKILL)
    retaken = next_report(events, "started", "k")
    assert retaken["token"] == started["token"] + 1
    events.rpush("gate:k", "open")
    assert result.get(timeout=30)["token"] == retaken["token"]
    assert runs(events, "k") == 2  # the killed run, and the takeover: never two at once


def test_paused_holder_cannot_commit_after_its_lease_was_taken_over(
    start_worker, producer, worker_conf, events
):
    paused = start_worker(worker_conf, queues="qa")
    start_worker(worker_conf, queues="qb")
    app = producer()
    task = app.tasks["t.by_label"]
    stale = task.apply_async(("p",), {"hold": "gate"}, queue="qa")
    first = next_report(events, "started", "p")
    paused.signal_group(signal.SIGSTOP)
    try:
        fresh = task.apply_async(("p",), queue="qb")
        winner = fresh.get(timeout=30)
    finally:
        paused.signal_group(signal.SIGCONT)
    assert winner["token"] == first["token"] + 1
    events.rpush("gate:p", "open")
    with pytest.raises(LeaseLost) as lost:
        stale.get(timeout=30)
    assert lost.value.token == first["token"]
    record = store_for(worker_conf["idempotency_redis_url"], {}).read(record_key(app, "t.by_label", "p"))
    assert record.state == "done" and record.token == winner["token"]
    assert task.apply_async(("p",), queue="qb").get(timeout=30) == winner


def test_task_running_five_leases_is_not_run_again_by_concurrent_duplicates(
    start_worker, producer, worker_conf, events
):
    start_worker({**worker_conf, "idempotency_lock_ttl": 1}, concurrency=3)
    app = producer()
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("long",), {"hold": 5})
    next_report(events, "started", "long")
    duplicates = [task.apply_async(("long",), {"hold": 5}) for _ in range(4)]
    result = holder.get(timeout=60)
    assert [d.get(timeout=60) for d in duplicates] == [result] * 4
    assert runs(events, "long") == 1


def test_visibility_timeout_redelivery_of_a_running_task_runs_it_once(
    start_worker, producer, worker_conf, events
):
    conf = {
        **worker_conf,
        "broker_transport_options": {
            "visibility_timeout": 2,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    }
    start_worker(conf, concurrency=3)
    app = producer(conf)
    plain = app.tasks["t.plain"].apply_async(("vplain",), {"hold": 6})
    protected = app.tasks["t.by_id"].apply_async(("videm",), {"hold": 6})
    if kombu.VERSION[:2] < (5, 7):
        # Kombu before 5.7 ignores the two restore options: a worker looks for
        # messages past visibility_timeout when it starts and then every 100 s.
        # Look once while both bodies run, as kombu 5.7's timer does every second.
        next_report(events, "started", "vplain")
        next_report(events, "started", "videm")
        time.sleep(2.5)
        with kombu.Connection(conf["broker_url"], transport_options=conf["broker_transport_options"]) as c:
            c.default_channel.qos.restore_visible(num=None)
    assert protected.get(timeout=60)["run"] == 1
    plain.get(timeout=60)
    assert runs(events, "vplain") > 1, "the broker did not redeliver; the scenario proves nothing"
    assert runs(events, "videm") == 1


def test_duplicate_requeues_without_spending_its_retry_budget(start_worker, producer, worker_conf, events):
    start_worker(worker_conf, concurrency=2)
    app = producer()
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("q",), {"hold": "gate", "fail": "error"})
    next_report(events, "started", "q")
    duplicate = task.apply_async(("q",))
    events.blpop(["retried:q"], timeout=30)
    events.blpop(["retried:q"], timeout=30)  # re-queued at least twice while held
    events.rpush("gate:q", "open")
    with pytest.raises(ValueError):
        holder.get(timeout=30)
    report = duplicate.get(timeout=30)
    assert report["retries"] == 0 and report["token"] == 2
    assert runs(events, "q") == 2


def test_raise_policy_fails_the_duplicate_with_the_holder(start_worker, producer, worker_conf, events):
    conf = {**worker_conf, "idempotency_on_conflict": "raise"}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("r",), {"hold": "gate"})
    next_report(events, "started", "r")
    with pytest.raises(DuplicateTaskInProgress) as busy:
        task.apply_async(("r",)).get(timeout=30)
    assert busy.value.holder == holder.id
    events.rpush("gate:r", "open")
    holder.get(timeout=30)
    assert runs(events, "r") == 1


def test_drop_policy_ends_the_duplicate_ignored(start_worker, producer, worker_conf, events):
    conf = {**worker_conf, "idempotency_on_conflict": "drop"}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("d",), {"hold": "gate"})
    next_report(events, "started", "d")
    dropped = task.apply_async(("d",))
    results = redis.Redis.from_url(app.conf.result_backend, decode_responses=True)
    meta_key = app.backend.get_key_for_task(dropped.id).decode()
    await_change(
        results, meta_key, results.get, lambda meta: meta and json.loads(meta)["status"] == states.IGNORED
    )
    events.rpush("gate:d", "open")
    holder.get(timeout=30)
    assert runs(events, "d") == 1


def test_wait_policy_returns_the_holders_result(start_worker, producer, worker_conf, events):
    conf = {**worker_conf, "idempotency_on_conflict": "wait"}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("w",), {"hold": "gate"})
    next_report(events, "started", "w")
    waiter = task.apply_async(("w",))
    events.rpush("gate:w", "open")
    assert waiter.get(timeout=30) == holder.get(timeout=30)
    assert runs(events, "w") == 1


def test_cached_failure_is_replayed_and_other_failures_free_the_key(
    start_worker, producer, worker_conf, events
):
    start_worker(worker_conf)
    app = producer()
    cached = app.tasks["t.cached_errors"]
    with pytest.raises(Cached):
        cached.delay("ce", fail="cached").get(timeout=30)
    with pytest.raises(Cached):
        cached.delay("ce").get(timeout=30)
    assert runs(events, "ce") == 1
    with pytest.raises(ValueError):
        cached.delay("fe", fail="error").get(timeout=30)
    assert cached.delay("fe").get(timeout=30)["token"] == 2
    assert runs(events, "fe") == 2


def test_self_retry_reacquires_and_records_the_retry(start_worker, producer, worker_conf, events):
    start_worker(worker_conf)
    app = producer()
    report = app.tasks["t.by_label"].delay("rt", fail="retry_once").get(timeout=30)
    assert report["run"] == 2 and report["retries"] == 1 and report["token"] == 2
    assert app.tasks["t.by_label"].delay("rt").get(timeout=30) == report


def test_terminated_task_frees_its_key_at_once(start_worker, producer, worker_conf, events):
    conf = {**worker_conf, "idempotency_lock_ttl": 60}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    victim = task.apply_async(("rv",), {"hold": "gate"})
    next_report(events, "started", "rv")
    app.control.revoke(victim.id, terminate=True, signal="SIGKILL")
    key = record_key(app, "t.by_label", "rv")
    await_record(events, key, lambda f: f.get("state") == "free")
    # Without the release this would wait out the 60 s lease.
    assert task.delay("rv").get(timeout=20)["token"] == 2


def test_chain_republished_runs_every_step_once(start_worker, producer, worker_conf, events):
    start_worker(worker_conf)
    app = producer()
    step = app.tasks["t.step"]
    workflow = step.s(None, "c1") | step.s("c2") | step.s("c3")
    workflow.freeze()  # fixes every step's task id, as a republished message carries them
    first = workflow.apply_async().get(timeout=30)
    assert first == ["c1", "c2", "c3"]
    again = workflow.apply_async().get(timeout=30)
    assert again == first
    assert [runs(events, label) for label in ("c1", "c2", "c3")] == [1, 1, 1]


def test_many_concurrent_duplicates_on_a_worker_run_once(start_worker, producer, worker_conf, events):
    start_worker(worker_conf, concurrency=4)
    app = producer()
    task = app.tasks["t.by_label"]
    results = [task.apply_async(("storm",), {"hold": 0.5}) for _ in range(32)]
    values = [r.get(timeout=60) for r in results]
    assert all(v == values[0] for v in values)
    assert runs(events, "storm") == 1


@pytest.fixture
def records_redis():
    with RedisServer(appendonly=True) as server:
        yield server


def backend_conf(worker_conf, records_redis, policy):
    return {**worker_conf, "idempotency_redis_url": records_redis.url, "idempotency_on_backend_error": policy}


def test_backend_error_retry_requeues_until_redis_returns_then_runs_once(
    start_worker, producer, worker_conf, events, records_redis
):
    conf = backend_conf(worker_conf, records_redis, "retry")
    start_worker(conf)
    app = producer(conf)
    records_redis.stop()
    result = app.tasks["t.by_label"].delay("down")
    assert events.blpop(["retried:down"], timeout=30) is not None
    assert runs(events, "down") == 0
    records_redis.start()
    assert result.get(timeout=60)["token"] == 1
    assert runs(events, "down") == 1


def test_backend_error_raise_fails_without_running(
    start_worker, producer, worker_conf, events, records_redis
):
    conf = backend_conf(worker_conf, records_redis, "raise")
    start_worker(conf)
    app = producer(conf)
    records_redis.stop()
    from celery_idem.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable):
        app.tasks["t.by_label"].delay("raise").get(timeout=30)
    assert runs(events, "raise") == 0


def test_backend_error_run_runs_unprotected(start_worker, producer, worker_conf, events, records_redis):
    conf = backend_conf(worker_conf, records_redis, "run")
    start_worker(conf)
    app = producer(conf)
    records_redis.stop()
    assert app.tasks["t.by_label"].delay("run").get(timeout=30)["token"] is None
    assert runs(events, "run") == 1


def test_callable_key_deduplicates_what_the_function_says_is_one_call(
    start_worker, producer, worker_conf, events
):
    start_worker(worker_conf)
    app = producer()
    task = app.tasks["t.by_callable"]
    first = task.delay("fn", hold=None).get(timeout=30)
    assert task.delay("fn", hold=0).get(timeout=30) == first
    assert runs(events, "fn") == 1


def test_per_call_key_override_travels_in_the_header(start_worker, producer, worker_conf, events):
    start_worker(worker_conf)
    app = producer()
    task = app.tasks["t.by_id"]
    first = task.apply_async(("ov",), idempotency_key="payment-42").get(timeout=30)
    again = task.apply_async(("ov",), idempotency_key="payment-42").get(timeout=30)
    other = task.apply_async(("ov",), idempotency_key="payment-43").get(timeout=30)
    assert again == first and other["run"] == 2
    assert runs(events, "ov") == 2


def test_a_retry_keeps_the_key_given_per_call(start_worker, producer, worker_conf, events):
    # The retry's message must carry the per-call key (Celery copies the request's
    # headers into it), or the retry would run under its task id's key and a
    # resubmission with the same key would run the body again.
    start_worker(worker_conf)
    app = producer()
    task = app.tasks["t.by_id"]
    first = task.apply_async(("okr",), {"fail": "retry_once"}, idempotency_key="refund-7").get(timeout=30)
    assert first["retries"] == 1 and first["token"] == 2
    again = task.apply_async(("okr",), {"fail": "retry_once"}, idempotency_key="refund-7").get(timeout=30)
    assert again == first
    assert runs(events, "okr") == 2


def test_send_task_by_name_without_header_is_protected_by_the_worker(
    start_worker, producer, worker_conf, events
):
    start_worker(worker_conf)
    app = producer()
    first = app.send_task("t.by_args", ("st",)).get(timeout=30)
    again = app.send_task("t.by_args", ("st",), {"hold": None}).get(timeout=30)
    stamped = app.tasks["t.by_args"].delay("st").get(timeout=30)
    assert again == first == stamped
    assert runs(events, "st") == 1


def test_duplicate_callbacks_receive_the_cached_result(start_worker, producer, worker_conf, events):
    start_worker(worker_conf)
    app = producer()
    step = app.tasks["t.step"]
    first = app.tasks["t.by_args"].apply_async(("cb",), link=step.s("after-first"))
    report = first.get(timeout=30)
    late = app.tasks["t.by_args"].apply_async(("cb",), link=step.s("after-late"))
    assert late.get(timeout=30) == report
    assert next_report(events, "finished", "after-first")["run"] == 1
    assert next_report(events, "finished", "after-late")["run"] == 1
    assert runs(events, "cb") == 1


def test_commit_survives_a_redis_restart_after_the_body_ran(start_worker, producer, worker_conf, events):
    with RedisServer(appendonly=True) as records:
        conf = {**worker_conf, "idempotency_redis_url": records.url, "idempotency_lock_ttl": 20}
        start_worker(conf)
        app = producer(conf)
        result = app.tasks["t.by_label"].apply_async(("rs",), {"hold": "gate"})
        next_report(events, "started", "rs")
        records.stop()
        events.rpush("gate:rs", "open")
        next_report(events, "finished", "rs")  # the body returned; the commit now fails
        records.start()
        report = result.get(timeout=60)
        assert app.tasks["t.by_label"].delay("rs").get(timeout=30) == report
        assert runs(events, "rs") == 1


def shape(value):
    """A result tuple with its task ids blanked, to compare two runs' results."""
    if isinstance(value, list):
        return [shape(item) for item in value]
    return "<id>" if isinstance(value, str) else value


@pytest.mark.parametrize("kind", ["async", "group", "chain"])
def test_a_task_returning_a_result_object_is_recorded_and_replayed_as_celery_stores_it(
    start_worker, producer, worker_conf, events, kind
):
    from celery.result import result_from_tuple

    start_worker(worker_conf, concurrency=2)
    app = producer()
    first = app.tasks["t.spawn"].apply_async((f"sp-{kind}", kind), task_id=f"spawn-{kind}")
    recorded = first.get(timeout=30)
    assert first.state == states.SUCCESS
    again = app.tasks["t.spawn"].apply_async((f"sp-{kind}", kind), task_id=f"spawn-{kind}")
    assert again.get(timeout=30) == recorded
    assert runs(events, f"sp-{kind}") == 1
    # What a plain task returning the same object gives to AsyncResult.get().
    plain = app.tasks["t.plain_spawn"].delay(f"plain-{kind}", kind).get(timeout=30)
    assert shape(recorded) == shape(plain)
    spawned = result_from_tuple(recorded, app)
    assert outcome(spawned, 30) == ([2, 4] if kind == "group" else 2 if kind == "async" else 4)
