"""Submit-side deduplication and payload validation, with real brokers and workers.

``t.validated`` is keyed on its label, checks its other arguments against the
record's (``idempotency_validate_payload``, on by default for keys on some
arguments) and is deduplicated when sent (``idempotency_dedupe_on_submit``).
"""

from __future__ import annotations

import pytest
from kombu import Connection

from celery_idem.errors import IdempotencyPayloadMismatch
from tests.helpers import await_change, runs


def queue_length(conf: dict, events) -> int:
    if conf["broker_url"].startswith("amqp"):
        with Connection(conf["broker_url"]) as connection:
            return connection.default_channel.queue_declare(
                conf["task_default_queue"], passive=True
            ).message_count
    broker = events.connection_pool.connection_kwargs
    import redis

    client = redis.Redis(host=broker["host"], port=broker["port"], db=1)
    try:
        return int(client.llen(conf["task_default_queue"]))
    finally:
        client.close()


def test_a_double_submit_sends_one_message_and_returns_one_result_handle(broker_conf, producer, events):
    app = producer(broker_conf)
    task = app.tasks["t.validated"]
    with app.connection_for_write() as connection:  # the queue exists before anything is sent
        app.amqp.queues[broker_conf["task_default_queue"]](connection.default_channel).declare()
    first = task.delay("click", 100)
    second = task.delay("click", 100)
    assert second.id == first.id
    assert queue_length(broker_conf, events) == 1


def test_both_submits_get_the_one_result_once_a_worker_ran_it(broker_conf, start_worker, producer, events):
    start_worker(broker_conf)
    app = producer(broker_conf)
    task = app.tasks["t.validated"]
    first = task.delay("paid", 100)
    value = first.get(timeout=30)
    again = task.delay("paid", 100)  # after it finished: no message, the same handle
    assert again.id == first.id and again.get(timeout=30) == value
    assert runs(events, "paid") == 1


def test_a_marker_whose_message_was_lost_expires_and_a_new_submit_goes_through(
    broker_conf, start_worker, producer, events
):
    conf = {**broker_conf, "idempotency_submit_ttl": 0.5}
    app = producer(conf)
    task = app.tasks["t.validated"]
    lost = task.delay("lost", 100)
    app.control.purge()  # the message is lost before any worker consumed it
    record = task.record_key_for(("lost", 100))
    await_change(events, record, events.exists, lambda found: not found)  # the marker expired
    start_worker(conf)
    retried = task.delay("lost", 100)
    assert retried.id != lost.id
    assert retried.get(timeout=30)["label"] == "lost"
    assert runs(events, "lost") == 1


def test_a_submit_with_other_arguments_under_a_used_key_is_refused(broker_conf, producer):
    app = producer(broker_conf)
    task = app.tasks["t.validated"]
    task.delay("order-9", 100)
    with pytest.raises(IdempotencyPayloadMismatch, match="amount differ"):
        task.delay("order-9", 250)


def test_a_duplicate_with_other_arguments_fails_in_the_worker_and_leaves_the_record(
    broker_conf, start_worker, producer, events
):
    start_worker(broker_conf)
    app = producer(broker_conf)
    task = app.tasks["t.validated"]
    first = task.delay("order-7", 100).get(timeout=30)
    # Another producer (send_task: no submit-side check, no payload header) reuses the key.
    other = app.send_task("t.validated", ("order-7", 250))
    with pytest.raises(IdempotencyPayloadMismatch) as refused:
        other.get(timeout=30)
    assert refused.value.arguments == ["amount"] and "250" not in str(refused.value)
    assert task.delay("order-7", 100).get(timeout=30) == first
    assert runs(events, "order-7") == 1
