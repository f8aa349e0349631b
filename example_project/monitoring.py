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

With ``EXAMPLE_TRACE=1``, :func:`trace` reports where a body is to
``example:trace:<queue>``, which the demo's killer reads to SIGKILL bodies at chosen
moments (see :mod:`example_project.demo.killer`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, Task, signals

from celery_idem.signals import lease_taken_over, task_replayed

from . import settings

METRICS_KEY = "example:metrics"
READY_KEY = "example:ready:{hostname}"
TRACE_KEY = "example:trace:{queue}"

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


def trace(phase: str, order_id: int) -> None:
    """Report that this process's body of ``order_id`` reached ``phase`` (with ``EXAMPLE_TRACE=1``).

    The report names the pool process and its worker (the parent), so a reader can
    tell which process to signal and whose worker it is.
    """
    if settings.TRACE:
        report = {"phase": phase, "order_id": order_id, "pid": os.getpid(), "ppid": os.getppid()}
        client(settings.REDIS_URL).rpush(TRACE_KEY.format(queue=settings.QUEUE), json.dumps(report))


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
