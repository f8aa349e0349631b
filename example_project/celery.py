"""The Celery app of the payments example, configured from :mod:`example_project.settings`."""

from __future__ import annotations

from celery import Celery

from . import monitoring, settings

app = Celery(
    "example_project",
    broker=settings.BROKER_URL,
    backend=settings.REDIS_URL,
    include=["example_project.tasks"],
)
app.conf.update(
    task_default_queue=settings.QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # At-least-once delivery, for the plain tasks too: a message is acknowledged
    # after its task ran, and a worker that dies mid-task gets it delivered again.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One message reserved per process: a killed worker takes few messages with it,
    # and a long task does not hold back messages another process could run.
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    idempotency_redis_url=settings.REDIS_URL,
    # The lease: how long the key of a run whose worker died stays taken before
    # another delivery may take it over. A running task renews it every third of
    # it, so it bounds how fast a crash is recovered from, not how long a task may
    # run. The library's default is 30 s; 5 s lets the demo recover from its
    # killed worker quickly, at the cost of a renewal every 1.7 s per running task.
    idempotency_lock_ttl=5,
)

if settings.BROKER_URL.startswith(("redis://", "rediss://", "redis+socket://")):
    app.conf.broker_transport_options = {
        # The Redis transport has no connection-bound acknowledgement: a message
        # taken by a worker that is then killed as a whole (main process too) stays
        # in the "unacked" hash until a live worker restores it, which it does only
        # for messages older than visibility_timeout (default one hour). 10 s brings
        # a killed worker's messages back within seconds. Any task still running
        # after 10 s is delivered a second time too: for an IdempotentTask that
        # second delivery waits for the first and returns its result, for a plain
        # task it is a second run; keep tasks well under it or raise it.
        "visibility_timeout": 10,
        # Look for such messages every second instead of every 100 s.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

monitoring.install(app)
