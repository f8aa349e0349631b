"""Duplicate storms against real workers on real brokers, under crashes.

Every scenario counts side effects: a body that completes adds one to
``effects[label]`` just before returning. At the end every label must have exactly
one effect (none duplicated, none lost) and every message sent must have succeeded.

Kills are aimed at pool processes that reported starting a body and are still in
it (bodies work for a few hundred milliseconds), so they land mid-task, before the
side effect; a crash between a side effect and its commit re-runs the body, which
the README states as a limit.

The RabbitMQ variants use the ``broker_conf`` fixture (see ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import pytest
import redis

from celery_idem.testing import RedisServer
from tests.helpers import outcome

pytestmark = pytest.mark.chaos


class Killer(threading.Thread):
    """SIGKILLs every ``every``-th pool process seen starting a body, while it works."""

    def __init__(self, events: redis.Redis, every: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.events = events
        self.every = every
        self.limit = limit
        self.kills = 0
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.is_set() and self.kills < self.limit:
            item = self.events.blpop(["starts"], timeout=1)
            if item is None:
                continue
            seen += 1
            if seen % self.every == 0:
                try:
                    os.kill(json.loads(item[1])["pid"], signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def assert_exactly_once(events: redis.Redis, labels: set[str]) -> None:
    effects = {label: int(count) for label, count in events.hgetall("effects").items()}
    duplicated = {label: n for label, n in effects.items() if n > 1}
    lost = sorted(label for label in labels if effects.get(label, 0) == 0)
    assert not duplicated, f"side effects duplicated: {duplicated}"
    assert not lost, f"side effects lost: {lost}"
    assert set(effects) == labels


def work() -> float:
    return random.uniform(0.2, 0.5)


def test_redelivery_storm_with_killed_pool_processes_and_workers(broker_conf, start_worker, producer, events):
    conf = broker_conf
    workers = [start_worker(conf, concurrency=2), start_worker(conf, concurrency=2)]
    app = producer(conf)
    task = app.tasks["t.by_id"]
    killer = Killer(events, every=15, limit=6)
    killer.start()
    labels = {f"r{i}" for i in range(200)}
    results = []
    for label in sorted(labels):
        task_id = f"id-{label}"
        results.append(task.apply_async((label,), {"hold": work()}, task_id=task_id))
        if label.endswith(("3", "7")):  # a producer republishing after a timeout
            results.append(task.apply_async((label,), {"hold": work()}, task_id=task_id))
    # Whole workers die mid-storm (main process and children) and come back, while
    # fetching, running and acknowledging messages.
    for round_ in range(3):
        for _ in range(10):
            events.blpop(["starts"], timeout=60)
        workers[round_ % 2].kill()
        workers[round_ % 2] = start_worker(conf, concurrency=2)
    try:
        for result in results:
            outcome(result, 180)
    finally:
        killer.stop()
    assert killer.kills > 0
    assert_exactly_once(events, labels)


def test_resubmitted_arguments_under_fresh_ids_run_once(broker_conf, start_worker, producer, events):
    start_worker(broker_conf, concurrency=2)
    start_worker(broker_conf, concurrency=2)
    app = producer(broker_conf)
    task = app.tasks["t.by_args"]
    killer = Killer(events, every=20, limit=3)
    killer.start()
    labels = {f"s{i}" for i in range(60)}
    results = [task.apply_async((label, 0.3)) for label in sorted(labels) for _ in range(3)]
    try:
        values = {}
        for result in results:
            value = outcome(result, 180)
            values.setdefault(value["label"], value)
            assert value == values[value["label"]]
    finally:
        killer.stop()
    assert_exactly_once(events, labels)


def test_late_resends_after_completion_are_served_from_the_record(
    broker_conf, start_worker, producer, events
):
    start_worker(broker_conf, concurrency=2)
    app = producer(broker_conf)
    by_id, by_args = app.tasks["t.by_id"], app.tasks["t.by_args"]
    firsts = {}
    for i in range(40):
        firsts[f"i{i}"] = by_id.apply_async((f"i{i}",), task_id=f"late-{i}")
        firsts[f"a{i}"] = by_args.apply_async((f"a{i}",))
    first_values = {label: outcome(result, 120) for label, result in firsts.items()}
    late = []
    for i in range(40):
        late.append((f"i{i}", by_id.apply_async((f"i{i}",), task_id=f"late-{i}")))
        late.append((f"a{i}", by_args.apply_async((f"a{i}",))))
    for label, result in late:
        assert outcome(result, 120) == first_values[label]
    assert_exactly_once(events, set(firsts))


def test_visibility_timeout_redeliveries_of_running_tasks(start_worker, producer, worker_conf, events):
    conf = {
        **worker_conf,
        "broker_transport_options": {
            "visibility_timeout": 2,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
    }
    start_worker(conf, concurrency=4)
    start_worker(conf, concurrency=4)
    app = producer(conf)
    task = app.tasks["t.by_id"]
    labels = {f"v{i}" for i in range(24)}
    results = [task.apply_async((label,), {"hold": random.uniform(0.5, 4)}) for label in sorted(labels)]
    for result in results:
        outcome(result, 180)
    assert_exactly_once(events, labels)


def test_records_redis_restarted_mid_run_loses_and_duplicates_nothing(
    broker_conf, start_worker, producer, events
):
    with RedisServer(appendonly=True) as records:
        conf = {**broker_conf, "idempotency_redis_url": records.url, "idempotency_lock_ttl": 10}
        start_worker(conf, concurrency=2)
        start_worker(conf, concurrency=2)
        app = producer(conf)
        task = app.tasks["t.by_label"]
        labels = [f"x{i}" for i in range(80)]
        results = [task.apply_async((label, work())) for label in labels]
        for _ in range(10):
            events.blpop(["starts"], timeout=60)
        records.restart()
        results += [task.apply_async((label, work())) for label in labels]  # duplicates, across the restart
        for result in results:
            outcome(result, 180)
        assert_exactly_once(events, set(labels))


def test_chain_whose_first_message_is_redelivered_runs_every_step_once(
    broker_conf, start_worker, producer, events
):
    start_worker(broker_conf, concurrency=2)
    app = producer(broker_conf)
    step = app.tasks["t.step"]
    workflows = []
    for i in range(10):
        workflow = step.s(None, f"c{i}-1") | step.s(f"c{i}-2") | step.s(f"c{i}-3")
        workflow.freeze()
        workflows.append(workflow)
    firsts = [workflow.apply_async() for workflow in workflows]
    redelivered = [workflow.apply_async() for workflow in workflows]  # same ids, while the first runs
    for first, again in zip(firsts, redelivered):
        assert outcome(again, 120) == outcome(first, 120)
    assert_exactly_once(events, {f"c{i}-{n}" for i in range(10) for n in (1, 2, 3)})
