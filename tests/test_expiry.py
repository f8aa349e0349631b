"""``expires`` of an idempotent task is enforced by the worker, which records it.

Celery turns ``expires`` into a header the worker checks and, on RabbitMQ, into the
message's TTL. RabbitMQ drops a message whose TTL ran out while it waited behind a
full prefetch window (``acks_late``, which IdempotentTask turns on), and nobody
records anything: ``result.get()`` waits forever. An idempotent task's message
carries only the header (``idempotency_worker_expiry``), so the worker that gets
it discards it and records REVOKED.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from celery import states
from celery.exceptions import TaskRevokedError

from tests.helpers import next_report


def test_an_expired_task_waiting_behind_a_running_one_is_recorded_as_revoked(
    broker_conf, start_worker, producer, events
):
    start_worker(broker_conf)  # one process, one message prefetched
    app = producer(broker_conf)
    holder = app.tasks["t.by_label"].delay("holder", "gate")
    next_report(events, "started", "holder")
    # Expired already: RabbitMQ drops such a message at once unless a consumer
    # can take it, and this worker's prefetch window is full.
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    expired = app.tasks["t.by_id"].apply_async(("expired",), expires=past)
    plain = app.tasks["t.plain"].apply_async(("plain-expired",), expires=past)
    events.rpush("gate:holder", "1")
    holder.get(timeout=30)
    # Queued after both: once it has run, the worker has had both before it.
    app.tasks["t.by_id"].delay("after").get(timeout=30)

    with pytest.raises(TaskRevokedError):
        expired.get(timeout=30)
    assert expired.state == states.REVOKED
    if broker_conf["broker_url"].startswith("amqp"):
        # The hazard, with a plain task: dropped unseen, its result never comes.
        assert plain.state == states.PENDING
    else:
        assert plain.state == states.REVOKED
