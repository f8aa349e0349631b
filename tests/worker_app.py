"""The Celery app that test workers run, and that tests use to send tasks.

A worker process builds it from the JSON in ``IDEM_TEST_CONF``; a test builds the
same app with :func:`make_app` and the same dict, so producer and worker agree.
Task bodies report to the records' Redis server: ``runs:<label>`` counts executions
(the side effect the tests count), ``started:<label>`` / ``finished:<label>`` are
lists the tests block on, and ``gate:<label>`` holds a body until the test opens it.
With ``test_count_traffic`` set, workers also count the task messages they publish
and the deliveries they finish in the ``traffic`` hash (see ``tests/test_canvas.py``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery, Task, group, signals

from celery_idem import IdempotentTask
from celery_idem import signals as idem_signals

_clients: dict[tuple[int, str], redis.Redis] = {}


def events(url: str) -> redis.Redis:
    """A client for this process (a fresh one after a fork)."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, decode_responses=True, socket_timeout=None)
    return _clients[key]


def events_url(app: Celery) -> str:
    """Where bodies report: ``test_events_url``, else the records' server."""
    return app.conf.get("test_events_url") or app.conf.idempotency_redis_url


class Cached(Exception):
    """A failure the tests configure as cached."""


def body(task: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
    """The shared body: count the run, report it, optionally wait or fail."""
    r = events(events_url(task.app))
    lease = getattr(task, "idempotency", None)
    token = lease.token if lease is not None else None
    runs = r.incr(f"runs:{label}")
    report = {
        "label": label,
        "pid": os.getpid(),
        "token": token,
        "task_id": task.request.id,
        "run": runs,
        "retries": task.request.retries,
    }
    r.rpush(f"started:{label}", json.dumps(report))
    r.rpush("starts", json.dumps(report))
    if hold == "gate" or (hold == "first" and runs == 1):
        # "first": only the first run waits (a test kills it; later runs go on).
        if r.blpop([f"gate:{label}"], timeout=120) is None:
            raise RuntimeError(f"gate:{label} was never opened")
    elif hold and hold != "first":
        time.sleep(hold)  # the task's own work takes this long
    if fail == "cached":
        raise Cached(label)
    if fail == "error":
        raise ValueError(label)
    if fail == "retry_once" and runs == 1:
        raise task.retry(countdown=0.1)
    r.hincrby("effects", label, 1)  # the side effect the chaos tests count
    r.rpush(f"finished:{label}", json.dumps(report))
    return report


def collect_body(task: Task, received: Any, label: str) -> dict[str, Any]:
    """A chord body, callback or errback: count the run and report what it received."""
    r = events(events_url(task.app))
    report = {
        "label": label,
        "task_id": task.request.id,
        "run": r.incr(f"runs:{label}"),
        "received": received,
    }
    r.rpush(f"finished:{label}", json.dumps(report))
    return report


def tick_body(task: Task, total: int) -> None:
    """A short body for drains: record when it ran; announce the last one."""
    r = events(events_url(task.app))
    r.rpush("ticks", time.time())
    if r.incr("ticks:count") == total:
        r.rpush("ticks:drained", "1")


def add_ledger_row(conn: Any, order_id: str, cents: int, work: float) -> int:
    """The side effect the effects tests count: one row per charge (no unique constraint)."""
    row = conn.execute(
        "INSERT INTO ledger (order_id, cents) VALUES (%s, %s) RETURNING id", (order_id, cents)
    ).fetchone()
    time.sleep(work)  # the transaction's own work: a kill can land inside it
    return int(row[0])


def send_receipt(url: str, order_id: str) -> str:
    events(url).hincrby("receipts", order_id, 1)
    return f"receipt-{order_id}-{os.getpid()}"


def charge_body(task: Task, order_id: str, cents: int, work: list[float], gate: bool) -> dict[str, Any]:
    """Work before, inside and after the transaction, each a kill may land in."""
    r = events(events_url(task.app))
    report = {"label": order_id, "pid": os.getpid(), "task_id": task.request.id}
    r.rpush(f"started:{order_id}", json.dumps(report))
    r.rpush("starts", json.dumps(report))
    if gate and r.blpop([f"gate:{order_id}"], timeout=120) is None:
        raise RuntimeError(f"gate:{order_id} was never opened")
    time.sleep(work[0])
    run = getattr(task, "idempotency", None)
    if run is None:  # plain celery.Task: the row is written directly
        import psycopg

        with psycopg.connect(task.app.conf.idempotency_database_url, autocommit=True) as conn:
            row = add_ledger_row(conn, order_id, cents, work[1])
        receipt = send_receipt(events_url(task.app), order_id)
    else:
        row = run.transaction(add_ledger_row, order_id, cents, work[1])
        receipt = run.step(send_receipt, events_url(task.app), order_id)
    time.sleep(work[2])
    return {"order_id": order_id, "ledger_row": row, "receipt": receipt}


def make_app(conf: dict[str, Any]) -> Celery:
    """Build the test app from ``conf`` (broker, Redis, and any idempotency settings)."""
    app = Celery("worker_app", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=None,
    )
    app.conf.update(conf)

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.by_id")
    def by_id(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.by_args", idempotency_key="args")
    def by_args(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    # The test tasks' own arguments (hold, fail) vary between deliveries of one label
    # on purpose: their arguments are not checked against the record's.
    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.by_label",
        idempotency_key=("label",),
        idempotency_validate_payload=False,
    )
    def by_label(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.cached_errors",
        idempotency_key=("label",),
        idempotency_validate_payload=False,
        idempotency_cache_errors=(Cached,),
    )
    def cached_errors(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.by_callable",
        idempotency_key=lambda label, hold=None, fail=None: f"order-{label}",
        idempotency_validate_payload=False,
    )
    def by_callable(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    @app.task(bind=True, shared=False, name="t.plain", acks_late=True, reject_on_worker_lost=True)
    def plain(self: Task, label: str, hold: Any = None, fail: str | None = None) -> dict[str, Any]:
        return body(self, label, hold, fail)

    @app.task(shared=False, name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    def spawn_body(task: Task, label: str, kind: str) -> Any:
        events(events_url(task.app)).incr(f"runs:{label}")
        if kind == "async":
            return add.delay(1, 1)
        if kind == "group":
            return group(add.s(1, 1), add.s(2, 2)).apply_async()
        return (add.s(1, 1) | add.s(2)).apply_async()

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.spawn")
    def spawn(self: Task, label: str, kind: str) -> Any:
        """Return the result object of tasks this one sent, as Celery allows."""
        return spawn_body(self, label, kind)

    @app.task(bind=True, shared=False, name="t.plain_spawn")
    def plain_spawn(self: Task, label: str, kind: str) -> Any:
        return spawn_body(self, label, kind)

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.tick", ignore_result=True)
    def tick(self: Task, total: int) -> None:
        tick_body(self, total)

    @app.task(bind=True, shared=False, name="t.plain_tick", acks_late=True, ignore_result=True)
    def plain_tick(self: Task, total: int) -> None:
        tick_body(self, total)

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.charge",
        idempotency_key=("order_id",),
        idempotency_validate_payload=False,
    )
    def charge(self: Task, order_id: str, cents: int, work: Any = None, gate: bool = False) -> dict[str, Any]:
        """Charge an order: a ledger row (in a transaction) and a receipt (a step)."""
        return charge_body(self, order_id, cents, work or [0, 0, 0], gate)

    @app.task(bind=True, shared=False, name="t.plain_charge", acks_late=True, reject_on_worker_lost=True)
    def plain_charge(
        self: Task, order_id: str, cents: int, work: Any = None, gate: bool = False
    ) -> dict[str, Any]:
        """The same charge on plain celery.Task: the ledger row is written directly."""
        return charge_body(self, order_id, cents, work or [0, 0, 0], gate)

    @app.task(
        base=IdempotentTask,
        bind=True,
        shared=False,
        name="t.validated",
        idempotency_key=("label",),
        idempotency_dedupe_on_submit=True,
    )
    def validated(self: Task, label: str, amount: int = 0) -> dict[str, Any]:
        """Keyed on its label, its amount checked against the record's; deduplicated when sent."""
        return {**body(self, label), "amount": amount}

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.collect")
    def collect(self: Task, received: Any, label: str) -> dict[str, Any]:
        """A chord body (gets the header's results), callback (the result) or errback (the task id)."""
        return collect_body(self, received, label)

    @app.task(bind=True, shared=False, name="t.plain_collect")
    def plain_collect(self: Task, received: Any, label: str) -> dict[str, Any]:
        return collect_body(self, received, label)

    @app.task(base=IdempotentTask, bind=True, shared=False, name="t.step")
    def step(self: Task, previous: Any, label: str) -> list[Any]:
        body(self, label)
        return [*(previous or []), label]

    return app


@signals.task_retry.connect(weak=False)
def _announce_retry(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    if request is not None and request.args:
        events(events_url(sender.app)).rpush(f"retried:{request.args[0]}", request.id)


@idem_signals.task_conflict.connect(weak=False)
def _announce_conflict(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    if request is not None and request.args:
        events(events_url(sender.app)).rpush(f"conflict:{request.args[0]}", request.id)


@signals.before_task_publish.connect(weak=False)
def _count_published(**kwargs: Any) -> None:
    # In a worker process, the app is this module's; a test process counts its own.
    if app.conf.get("test_count_traffic"):
        events(events_url(app)).hincrby("traffic", "published", 1)


@signals.task_postrun.connect(weak=False)
def _count_finished(sender: Any = None, **kwargs: Any) -> None:
    if sender is not None and sender.app.conf.get("test_count_traffic"):
        events(events_url(sender.app)).hincrby("traffic", "finished", 1)


@signals.worker_ready.connect(weak=False)
def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    r = events(events_url(sender.app))
    r.rpush(f"ready:{sender.hostname}", "1")


app = make_app(json.loads(os.environ.get("IDEM_TEST_CONF", "{}")))
