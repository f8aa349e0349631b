"""The Celery app of the payments example, configured from :mod:`example_project.settings`."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from . import ledger, monitoring, settings

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

# Where self.idempotency.transaction writes: the ledger's own database, so that a
# charge row and celery_idem's record of it commit in one transaction. PostgreSQL
# by URL (celery_idem connects with psycopg); SQLite through the ledger's Engine,
# whose transactions begin with BEGIN IMMEDIATE (see ledger.sqlite_engine).
if ledger.is_postgres(settings.LEDGER_URL):
    app.conf.idempotency_database_url = settings.LEDGER_URL
else:
    app.conf.idempotency_database = ledger.for_this_process().engine


@signals.worker_init.connect(weak=False)
def create_ledger_schema(sender: Any = None, **kwargs: Any) -> None:
    """Create the ledger's tables before the pool starts (celery_idem creates its own)."""
    ledger.for_this_process().create_schema()


@signals.worker_process_init.connect(weak=False)
def own_ledger_connections(**kwargs: Any) -> None:
    """Give a forked pool process connections of its own, the Engine's pool included."""
    ledger.for_this_process()


monitoring.install(app)
