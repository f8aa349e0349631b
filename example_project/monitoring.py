"""What the app reports to Redis for its operators: task counters and worker readiness.

Counters live in one hash, ``example:metrics``, one field per task and event
(``example_project.tasks.charge_order:replayed``), the way a statsd or Prometheus
exporter would count them:

* ``executed``: a task body started (counted by the bodies themselves);
* ``succeeded``: a delivery returned a result, whether its body ran or not;
* ``replayed``: a delivery was served the recorded result without running;
* ``taken_over``: a delivery took over the lease of a run that stopped renewing it.

A worker that is ready to consume pushes its pid to ``example:ready:<hostname>``,
so deployment scripts (and the demo) wait on that list instead of sleeping.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery, Task, signals

from celery_idem.signals import lease_taken_over, task_replayed

METRICS_KEY = "example:metrics"
READY_KEY = "example:ready:{hostname}"

_clients: dict[tuple[int, str], redis.Redis] = {}


def client(url: str) -> redis.Redis:
    """A client of this process for ``url`` (a forked pool process gets its own)."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, decode_responses=True)
    return _clients[key]


def count(task: Task, event: str) -> None:
    """Add one to ``<task name>:<event>``."""
    client(task.app.conf.idempotency_redis_url).hincrby(METRICS_KEY, f"{task.name}:{event}", 1)


def read(app: Celery) -> dict[str, int]:
    """Every counter, by field name."""
    fields = client(app.conf.idempotency_redis_url).hgetall(METRICS_KEY)
    return {str(field): int(value) for field, value in fields.items()}


def install(app: Celery) -> None:
    """Connect the receivers that count ``app``'s tasks and announce its workers."""

    def ours(sender: Any) -> bool:
        return sender is not None and getattr(sender, "app", None) is app

    @signals.task_success.connect(weak=False)
    def count_success(sender: Task | None = None, **kwargs: Any) -> None:
        if ours(sender):
            count(sender, "succeeded")

    @task_replayed.connect(weak=False)
    def count_replay(sender: Task | None = None, **kwargs: Any) -> None:
        if ours(sender):
            count(sender, "replayed")

    @lease_taken_over.connect(weak=False)
    def count_takeover(sender: Task | None = None, **kwargs: Any) -> None:
        if ours(sender):
            count(sender, "taken_over")

    @signals.worker_ready.connect(weak=False)
    def announce_ready(sender: Any = None, **kwargs: Any) -> None:
        if ours(sender):
            ready = client(app.conf.idempotency_redis_url)
            key = READY_KEY.format(hostname=sender.hostname)
            ready.rpush(key, os.getpid())
            ready.expire(key, 300)
