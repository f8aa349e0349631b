"""The Celery app that benchmark workers run, and that benchmarks publish with.

A worker builds it from the JSON in ``BENCH_CONF``: ``{"celery": {app settings},
"bench": {...}}``; the benchmark builds the same app with :func:`make_app` and the
same settings, so producer and worker agree. ``bench`` holds:

* ``control_url``: the Redis server reports go to (never the broker's or the
  records' server, so reporting does not show in their command counts);
* ``report_key``: the list the worker pushes its reports to;
* ``expect``: report once this many measured deliveries finished (0: never);
* ``count_round_trips``: count the records client's round trips;
* ``groups``: which tasks besides the plain one to define: ``"idem"`` (celery_idem's),
  ``"peers"`` (celery-once's and celery-singleton's).

A worker imports celery_idem only when it runs idempotent tasks: importing it
connects worker hooks, so the plain baseline is Celery without celery_idem, and
whatever those hooks cost counts as celery_idem's.

All measured tasks take one argument ``i`` and do nothing but mark their body's
start and end in :data:`benchmarks.probe.probe`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, signals

from .counting import CountingConnection, round_trips
from .probe import probe

__all__ = ["CONF_VARIABLE", "SNAPSHOT_TASK", "app", "group_of", "make_app"]

CONF_VARIABLE = "BENCH_CONF"

#: The task that reports counters mid-run; it is not a measured delivery.
SNAPSHOT_TASK = "bench.snapshot"

_PEER_TASKS = ("bench.once", "bench.singleton")


def group_of(task: str) -> tuple[str, ...]:
    """The groups :func:`make_app` needs to define ``task``."""
    if task.startswith("bench.effects."):
        plain = task in ("bench.effects.plain", "bench.effects.plain_tx")
        return ("effects",) if plain else ("idem", "effects")
    if task.startswith("bench.idem"):
        return ("idem",)
    if task in _PEER_TASKS:
        return ("peers",)
    return ()


_BENCH: dict[str, Any] = json.loads(os.environ.get(CONF_VARIABLE, "{}")).get("bench", {})
_clients: dict[str, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url)
    return _clients[url]


def _report(payload: dict[str, Any]) -> None:
    _client(_BENCH["control_url"]).rpush(_BENCH["report_key"], json.dumps(payload))


def make_app(settings: dict[str, Any], groups: Sequence[str] = (), count_round_trips: bool = False) -> Celery:
    """Build the benchmark app from ``settings`` (broker, records server, results)."""
    app = Celery("benchmarks", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=None,
    )
    app.conf.update(settings)
    if count_round_trips:
        app.conf.idempotency_redis_options = {"connection_class": CountingConnection}

    @app.task(shared=False, name="bench.plain", acks_late=True, reject_on_worker_lost=True)
    def plain(i: int) -> None:
        probe.body_start()
        probe.body_end()

    @app.task(shared=False, name=SNAPSHOT_TASK, ignore_result=True)
    def snapshot(label: str) -> None:
        stats = _client(app.conf.idempotency_redis_url).info("commandstats")
        commands = {name.split("_", 1)[1]: value["calls"] for name, value in stats.items()}
        _report({"label": label, "commands": commands, "round_trips": round_trips(), **probe.summary()})

    if "idem" in groups:
        _idempotent_tasks(app)
    if "effects" in groups:
        from .effects_tasks import register

        register(app, idempotent="idem" in groups)
    if "peers" in groups:
        from .peers.tasks import register

        register(app)
    return app


def _idempotent_tasks(app: Celery) -> None:
    from celery_idem import IdempotentTask

    @app.task(base=IdempotentTask, shared=False, name="bench.idem_id")
    def idem_id(i: int) -> None:
        probe.body_start()
        probe.body_end()

    @app.task(base=IdempotentTask, shared=False, name="bench.idem_args", idempotency_key="args")
    def idem_args(i: int) -> None:
        probe.body_start()
        probe.body_end()

    @app.task(base=IdempotentTask, shared=False, name="bench.idem_id_io")
    def idem_id_io(i: int) -> None:
        # Stands for a body that waits on I/O (a query, an HTTP call) for 1 ms,
        # letting other threads of the process run meanwhile.
        probe.body_start()
        time.sleep(0.001)
        probe.body_end()


@signals.task_prerun.connect(weak=False)
def _delivery_start(sender: Any = None, **kwargs: Any) -> None:
    if sender is not None and sender.name != SNAPSHOT_TASK:
        probe.delivery_start()


@signals.task_postrun.connect(weak=False)
def _delivery_end(sender: Any = None, **kwargs: Any) -> None:
    if sender is None or sender.name == SNAPSHOT_TASK:
        return
    if probe.delivery_end() == _BENCH.get("expect"):
        # The ``celery idem`` plugin imports celery_idem into every ``celery`` process,
        # whose hooks then leave a worker without idempotent tasks alone: what counts
        # is whether they acted (the request module) or the broker transport is in use.
        loaded = "celery_idem.request" in sys.modules or "celery_idem.broker" in sys.modules
        from .counting import statements

        _report(
            {
                "label": "done",
                "round_trips": round_trips(),
                "statements": statements(),
                "celery_idem_loaded": loaded,
                **probe.summary(),
            }
        )


@signals.worker_ready.connect(weak=False)
def _ready(sender: Any = None, **kwargs: Any) -> None:
    if _BENCH:
        _client(_BENCH["control_url"]).rpush(f"ready:{_BENCH['report_key']}", "1")


app = make_app(
    json.loads(os.environ.get(CONF_VARIABLE, "{}")).get("celery", {}),
    groups=_BENCH.get("groups", ()),
    count_round_trips=bool(_BENCH.get("count_round_trips")),
)
