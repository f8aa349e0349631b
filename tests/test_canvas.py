"""Canvas stays exact: chords, groups and callbacks whose tasks are delivered again.

A replayed delivery succeeds (or fails) again, so Celery sends its callbacks again and
returns its chord part again (see ``celery_idem/canvas.py`` and the README's
"Canvas"). The worker tests run on both brokers (``broker_conf``) and two result
backends: Redis, and the database backend on PostgreSQL (a database of this
session's own), which counts a chord by polling its header's results
(``celery.chord_unlock``) where Redis counts the parts the header tasks return.

Header tasks are delivered again three ways: (a) their messages republished, byte
for byte, while they run; (b) their pool process SIGKILLed mid-run, so that the
broker redelivers them; (c) their messages republished after the chord finished.
Bodies and callbacks count their runs in Redis. A test asserts only once nothing is
in flight: workers count the task messages they publish and the deliveries they
finish (``test_count_traffic``), :class:`Wire` counts what the test publishes, and
:meth:`Wire.quiet` waits for the two to meet (a delivery killed mid-run never
finishes, and its redelivery is not published again, so they still meet).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chord, group, signals
from celery.app.task import Context
from kombu.utils.json import dumps

from celery_idem import IdempotentTask, canvas
from tests.conftest import POSTGRES_URL, postgres_available
from tests.helpers import await_change, next_report, outcome, runs
from tests.worker_app import Cached, make_app

chaos = pytest.mark.chaos


class Wire:
    """What the test process publishes: counted as traffic, and kept to be sent again."""

    def __init__(self, events: redis.Redis) -> None:
        self.events = events
        self.messages: dict[str, dict[str, Any]] = {}
        signals.before_task_publish.connect(self._publishing, weak=False)

    def _publishing(
        self,
        body: Any = None,
        exchange: str = "",
        routing_key: str = "",
        headers: Any = None,
        properties: Any = None,
        **kwargs: Any,
    ) -> None:
        self.events.hincrby("traffic", "published", 1)
        self.messages.setdefault(
            headers["id"],
            {
                "body": dumps(body),
                "exchange": exchange,
                "routing_key": routing_key,
                "headers": copy.deepcopy(headers),
                "properties": copy.deepcopy(properties or {}),
            },
        )

    def resend(self, app: Celery, task_id: str) -> None:
        """Publish the message of ``task_id`` again, as a producer retrying would."""
        message = self.messages[task_id]
        self.events.hincrby("traffic", "published", 1)
        with app.producer_or_acquire() as producer:
            producer.publish(
                message["body"],
                exchange=message["exchange"],
                routing_key=message["routing_key"],
                headers=message["headers"],
                content_type="application/json",
                content_encoding="utf-8",
                **message["properties"],
            )

    def quiet(self, in_flight: int = 0, timeout: float = 120) -> None:
        """Return once every task message published but ``in_flight`` has been delivered and finished."""

        def settled(traffic: dict[str, str]) -> bool:
            return int(traffic.get("published", 0)) - int(traffic.get("finished", 0)) == in_flight

        await_change(self.events, "traffic", self.events.hgetall, settled, timeout)

    def close(self) -> None:
        signals.before_task_publish.disconnect(self._publishing)


@pytest.fixture
def wire(events: redis.Redis) -> Iterator[Wire]:
    wire = Wire(events)
    yield wire
    wire.close()


@pytest.fixture(scope="session")
def results_database() -> Iterator[str]:
    """A PostgreSQL database of this session's own, with Celery's result tables; dropped afterwards."""
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} and CI is set")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    name = f"idem_canvas_{os.getpid()}"
    admin_url = POSTGRES_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    url = f"db+postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    # Celery creates its tables on first use: here, once, not in racing worker processes.
    app = Celery("tables", set_as_current=False)
    app.conf.result_backend = url
    app.backend.ResultSession().close()
    app.close()
    yield url
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["redis-results", "database-results"])
def canvas_conf(request: pytest.FixtureRequest, broker_conf: dict[str, Any]) -> dict[str, Any]:
    """``broker_conf`` with traffic counted, on the Redis result backend or the database one."""
    conf = {**broker_conf, "test_count_traffic": True}
    if request.param == "database-results":
        conf["result_backend"] = request.getfixturevalue("results_database")
    return conf


def header_of(app: Celery, name: str, holds: list[Any]) -> list[Any]:
    return [app.tasks["t.by_id"].s(f"{name}-{i}", hold) for i, hold in enumerate(holds)]


def conflicted(events: redis.Redis, label: str) -> None:
    """Block until a copy of ``label``'s message found the original running."""
    assert events.blpop([f"conflict:{label}"], timeout=60) is not None, f"no copy of {label} met it running"


def kill_first_run(events: redis.Redis, label: str) -> None:
    """SIGKILL the pool process of ``label``'s first run (it waits at its gate, before its effect)."""
    os.kill(next_report(events, "started", label)["pid"], signal.SIGKILL)


def assert_no_repeat_warned(worker: Any) -> None:
    assert "may run twice" not in worker.log()


def assert_chord_exact(events: redis.Redis, result: Any, name: str, body: dict[str, Any]) -> None:
    """The body ran once, with every header result once, in header order; every header's effect once."""
    header = result.parent.results
    values = [outcome(part, 60) for part in header]
    assert runs(events, name) == 1, f"the chord body ran {runs(events, name)} times"
    assert [value["label"] for value in body["received"]] == [f"{name}-{i}" for i in range(len(header))]
    assert body["received"] == values
    assert outcome(result, 60) == body
    assert {label: int(n) for label, n in events.hgetall("effects").items()} == {
        f"{name}-{i}": 1 for i in range(len(header))
    }


@chaos
def test_chord_whose_header_tasks_are_republished_while_running_runs_its_body_once(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=4)
    app = producer(canvas_conf)
    result = chord(header_of(app, "a", ["gate"] * 3), app.tasks["t.collect"].s("a")).apply_async()
    labels = [f"a-{i}" for i in range(3)]
    for label in labels:
        next_report(events, "started", label)
    for part in result.parent.results:
        wire.resend(app, part.id)
    for label in labels:
        conflicted(events, label)
    for label in reversed(labels):  # the last one first: the body still gets them in header order
        events.rpush(f"gate:{label}", "open")
        next_report(events, "finished", label)
    body = next_report(events, "finished", "a")
    wire.quiet()
    assert_chord_exact(events, result, "a", body)
    assert_no_repeat_warned(worker)


@chaos
def test_chord_whose_header_task_is_killed_mid_run_runs_its_body_once(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=2)
    app = producer(canvas_conf)
    result = chord(header_of(app, "b", ["first", None, None]), app.tasks["t.collect"].s("b")).apply_async()
    kill_first_run(events, "b-0")
    body = next_report(events, "finished", "b")
    wire.quiet()
    assert runs(events, "b-0") == 2  # the killed run, and the redelivery that took it over
    assert_chord_exact(events, result, "b", body)
    assert_no_repeat_warned(worker)


@chaos
def test_chord_whose_header_tasks_are_republished_after_it_finished_runs_its_body_once(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=2)
    app = producer(canvas_conf)
    result = chord(header_of(app, "c", [None] * 3), app.tasks["t.collect"].s("c")).apply_async()
    body = next_report(events, "finished", "c")
    wire.quiet()
    for part in result.parent.results * 2:
        wire.resend(app, part.id)
    wire.quiet()
    assert_chord_exact(events, result, "c", body)
    assert_no_repeat_warned(worker)


@chaos
def test_group_whose_tasks_are_killed_and_republished_returns_each_result_once(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=4)
    app = producer(canvas_conf)
    result = group(header_of(app, "g", ["first", "gate", None])).apply_async()
    kill_first_run(events, "g-0")
    next_report(events, "started", "g-1")
    wire.resend(app, result.results[1].id)
    conflicted(events, "g-1")
    events.rpush("gate:g-1", "open")
    values = outcome(result, 60)
    wire.quiet()
    for part in result.results:
        wire.resend(app, part.id)
    wire.quiet()
    assert [value["label"] for value in values] == ["g-0", "g-1", "g-2"]
    again = app.GroupResult(result.id, [app.AsyncResult(part.id) for part in result.results])
    assert outcome(again, 60) == values
    assert [runs(events, f"g-{i}") for i in range(3)] == [2, 1, 1]
    assert {label: int(n) for label, n in events.hgetall("effects").items()} == {
        f"g-{i}": 1 for i in range(3)
    }
    assert_no_repeat_warned(worker)


@chaos
def test_link_callback_runs_once_when_its_task_is_republished_killed_or_replayed(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=4)
    app = producer(canvas_conf)
    by_id, collect = app.tasks["t.by_id"], app.tasks["t.collect"]
    # Callbacks as callers write them, without ids of their own.
    parents = {
        "running": by_id.apply_async(("running", "gate"), link=collect.s("running-cb")),
        "killed": by_id.apply_async(("killed", "first"), link=collect.s("killed-cb")),
        "done": by_id.apply_async(("done",), link=collect.s("done-cb")),
    }
    next_report(events, "started", "running")
    wire.resend(app, parents["running"].id)
    conflicted(events, "running")
    events.rpush("gate:running", "open")
    kill_first_run(events, "killed")
    received = {label: next_report(events, "finished", f"{label}-cb")["received"] for label in parents}
    wire.quiet()
    for parent in parents.values():
        wire.resend(app, parent.id)
    wire.quiet()
    for label, parent in parents.items():
        assert runs(events, f"{label}-cb") == 1, (
            f"the callback of {label} ran {runs(events, f'{label}-cb')} times"
        )
        assert received[label] == outcome(parent, 30)
        assert runs(events, label) == (2 if label == "killed" else 1)
    assert_no_repeat_warned(worker)


@chaos
def test_link_error_callback_runs_once_when_its_failed_task_is_republished_killed_or_replayed(
    canvas_conf, start_worker, producer, events, wire
):
    worker = start_worker(canvas_conf, concurrency=4)
    app = producer(canvas_conf)
    failing, collect = app.tasks["t.cached_errors"], app.tasks["t.collect"]
    parents = {
        "running": failing.apply_async(("running", "gate", "cached"), link_error=collect.s("running-eb")),
        "killed": failing.apply_async(("killed", "first", "cached"), link_error=collect.s("killed-eb")),
        "done": failing.apply_async(("done", None, "cached"), link_error=collect.s("done-eb")),
    }
    next_report(events, "started", "running")
    wire.resend(app, parents["running"].id)
    conflicted(events, "running")
    events.rpush("gate:running", "open")
    kill_first_run(events, "killed")
    received = {label: next_report(events, "finished", f"{label}-eb")["received"] for label in parents}
    wire.quiet()
    for parent in parents.values():
        wire.resend(app, parent.id)
    wire.quiet()
    for label, parent in parents.items():
        assert runs(events, f"{label}-eb") == 1, (
            f"the errback of {label} ran {runs(events, f'{label}-eb')} times"
        )
        assert received[label] == parent.id
        assert runs(events, label) == (2 if label == "killed" else 1)
        with pytest.raises(Cached):
            outcome(parent, 30)
    assert_no_repeat_warned(worker)


@chaos
def test_replay_that_sends_a_plain_callback_again_logs_a_warning(
    worker_conf, start_worker, producer, events, wire
):
    conf = {**worker_conf, "test_count_traffic": True}
    worker = start_worker(conf)
    app = producer(conf)
    parent = app.tasks["t.by_id"].apply_async(("p",), link=app.tasks["t.plain_collect"].s("p-cb"))
    outcome(parent, 30)
    wire.quiet()
    assert "may run twice" not in worker.log()
    wire.resend(app, parent.id)
    wire.quiet()
    assert runs(events, "p-cb") == 2  # the limit: a plain task has no record to return
    key = app.tasks["t.by_id"].record_key_for(task_id=parent.id)
    warnings = [line for line in worker.log().splitlines() if "may run twice" in line]
    assert len(warnings) == 1, warnings
    assert "WARNING" in warnings[0] and f"t.by_id[{parent.id}]" in warnings[0] and key in warnings[0]
    assert "link t.plain_collect" in warnings[0]


def failed_chord_replayed(conf, start_worker, producer, events, wire) -> Any:
    """A chord failed by its second header task, then the first one's message sent again."""
    worker = start_worker({**conf, "test_count_traffic": True}, concurrency=2)
    app = producer({**conf, "test_count_traffic": True})
    collect = app.tasks["t.collect"]
    header = [app.tasks["t.by_id"].s("f-0"), app.tasks["t.by_id"].s("f-1", None, "error")]
    result = chord(header, collect.s("f").on_error(collect.s("f-eb"))).apply_async()
    next_report(events, "finished", "f-eb")
    wire.quiet()
    wire.resend(app, result.parent.results[0].id)
    wire.quiet()
    assert runs(events, "f") == 0
    return worker, result


@chaos
def test_chord_failed_by_a_header_task_fails_once_when_another_is_replayed(
    canvas_conf, start_worker, producer, events, wire
):
    if canvas_conf["result_backend"].startswith("redis") and not canvas.REDIS_COUNTS_PARTS_ONCE:
        pytest.skip("Celery's Redis backend before 5.7 fails the chord again (see the next test)")
    worker, _ = failed_chord_replayed(canvas_conf, start_worker, producer, events, wire)
    assert runs(events, "f-eb") == 1
    assert_no_repeat_warned(worker)


@chaos
@pytest.mark.skipif(canvas.REDIS_COUNTS_PARTS_ONCE, reason="Celery 5.7 counts the part once")
def test_replay_after_a_redis_chord_failed_before_celery_5_7_logs_a_warning(
    worker_conf, start_worker, producer, events, wire
):
    worker, result = failed_chord_replayed(worker_conf, start_worker, producer, events, wire)
    assert runs(events, "f-eb") == 2  # the limit: the chord is failed again
    warnings = [line for line in worker.log().splitlines() if "may run twice" in line]
    assert len(warnings) == 1 and f"the failure of chord {result.parent.id}" in warnings[0]


def replayed_part_of_an_unordered_chord(conf, start_worker, producer, events, wire) -> Any:
    """A chord of two on an unordered Redis backend; the first part is replayed before the second ends."""
    conf = {
        **conf,
        "test_count_traffic": True,
        "result_backend_transport_options": {"result_chord_ordered": False},
    }
    worker = start_worker(conf, concurrency=2)
    app = producer(conf)
    result = chord(header_of(app, "u", [None, "gate"]), app.tasks["t.collect"].s("u")).apply_async()
    next_report(events, "finished", "u-0")
    next_report(events, "started", "u-1")
    wire.resend(app, result.parent.results[0].id)
    wire.quiet(in_flight=1)  # all but the gated part: the replay has returned its part
    events.rpush("gate:u-1", "open")
    wire.quiet()
    return worker, result


@chaos
@pytest.mark.skipif(not canvas.REDIS_COUNTS_PARTS_ONCE, reason="Celery before 5.7 adds the part again")
def test_replayed_part_of_an_unordered_redis_chord_is_counted_once(
    worker_conf, start_worker, producer, events, wire
):
    worker, result = replayed_part_of_an_unordered_chord(worker_conf, start_worker, producer, events, wire)
    body = next_report(events, "finished", "u")
    assert body["received"] == [outcome(part, 30) for part in result.parent.results]
    assert runs(events, "u") == 1
    assert_no_repeat_warned(worker)


@chaos
@pytest.mark.skipif(canvas.REDIS_COUNTS_PARTS_ONCE, reason="Celery 5.7 counts the part once")
def test_replayed_part_of_an_unordered_redis_chord_before_celery_5_7_logs_a_warning(
    worker_conf, start_worker, producer, events, wire
):
    worker, result = replayed_part_of_an_unordered_chord(worker_conf, start_worker, producer, events, wire)
    body = next_report(events, "finished", "u")
    first = outcome(result.parent.results[0], 30)
    assert body["received"] == [first, first]  # the limit: early, one result twice, one missing
    warnings = [line for line in worker.log().splitlines() if "may run twice" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert f"its part of chord {result.parent.id}" in warnings[0] and "start early" in warnings[0]


# -- which replays warn, without workers --------------------------------------------


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Any:
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == canvas.__name__]

    caplog.set_level(logging.WARNING, logger=canvas.__name__)
    return lines


def replay(app: Celery, **request: Any) -> None:
    task = app.tasks["t.by_id"]
    context = Context({"id": "parent", "group": None, "chord": None, **request})
    canvas.warn_of_repeats(task, context, "idem:{k}", failed=False)


def a_chord(app: Celery, body: str) -> dict[str, Any]:
    return {"group": "g1", "chord": dict(app.tasks[body].s("x").set(task_id="body-1"))}


def test_a_replayed_chord_part_warns_only_where_the_backend_may_count_it_twice(
    worker_conf, results_database, monkeypatch, warnings
):
    redis_app = make_app(worker_conf)
    unordered = make_app({**worker_conf, "result_backend_transport_options": {"result_chord_ordered": False}})
    database = make_app({**worker_conf, "result_backend": results_database})
    counter = make_app({**worker_conf, "result_backend": "cache+memory://"})
    monkeypatch.setattr(canvas, "REDIS_COUNTS_PARTS_ONCE", True)
    for app in (redis_app, unordered, database):
        replay(app, **a_chord(app, "t.collect"))
        replay(app, **a_chord(app, "t.plain_collect"))
    assert warnings() == []  # Celery 5.7's Redis backend, and chord_unlock, count a task once

    monkeypatch.setattr(canvas, "REDIS_COUNTS_PARTS_ONCE", False)
    replay(redis_app, **a_chord(redis_app, "t.collect"))
    assert warnings() == []  # the part is absorbed; a second body message returns the record
    replay(redis_app, **a_chord(redis_app, "t.plain_collect"))
    replay(unordered, **a_chord(unordered, "t.collect"))
    replay(database, **a_chord(database, "t.plain_collect"))
    replay(counter, **a_chord(counter, "t.collect"))
    plain_body, early, counted = warnings()
    assert "the chord body t.plain_collect" in plain_body and "idem:{k}" in plain_body
    assert "its part of chord g1" in early and "start early" in early
    assert "its part of chord g1 (counted again by CacheBackend" in counted
    for app in (redis_app, unordered, database, counter):
        app.close()


def test_a_replay_warns_of_the_callbacks_errbacks_and_chain_steps_that_may_run_twice(worker_conf, warnings):
    app = make_app(worker_conf)

    @app.task(base=IdempotentTask, shared=False, name="t.inline_errback")
    def inline_errback(request: Any, exc: Any, traceback: Any) -> None:
        """Celery calls an errback taking (request, exc, traceback) in the failed task's process."""

    collect, plain = app.tasks["t.collect"], app.tasks["t.plain_collect"]
    task = app.tasks["t.by_id"]
    succeeded = Context(
        {"id": "p", "callbacks": [collect.s("a"), group(plain.s("b"), collect.s("c")), {"task": "elsewhere"}]}
    )
    succeeded.chain = [plain.s("next")]
    canvas.warn_of_repeats(task, succeeded, "idem:{k}", failed=False)
    failed = Context(
        {"id": "q", "errbacks": [collect.s("d"), inline_errback.s()], "callbacks": [plain.s("e")]}
    )
    canvas.warn_of_repeats(task, failed, "idem:{k}", failed=True)
    canvas.warn_of_repeats(
        task, Context({"id": "r", "callbacks": [collect.s("f")]}), "idem:{k}", failed=False
    )
    result, failure = warnings()
    assert result.startswith("celery-idem: t.by_id[p] replayed the recorded result of idem:{k};")
    assert result.endswith(
        "link t.plain_collect; link elsewhere (not registered here); chain step t.plain_collect"
    )
    assert failure.startswith("celery-idem: t.by_id[q] replayed the recorded failure of idem:{k};")
    assert failure.endswith("link_error t.inline_errback (called in the worker, not sent)")
    app.close()


def test_callbacks_get_ids_from_their_delivery_and_place_and_keep_their_own(producer):
    app = producer()
    collect = app.tasks["t.collect"]
    frozen = collect.s("frozen").set(task_id="mine")
    fan_out = group(collect.s("a"), collect.s("b"))
    callbacks = [collect.s("x"), frozen, fan_out]
    first, again, other = (Context({"id": i, "callbacks": callbacks}) for i in ("p1", "p1", "p2"))
    for context in (first, again, other):
        canvas.pin_callback_ids(context)
    ids = [
        [
            cb["options"]["task_id"]
            for cb in (c.callbacks[0], c.callbacks[1], *c.callbacks[2]["kwargs"]["tasks"])
        ]
        for c in (first, again, other)
    ]
    assert ids[0] == ids[1] and ids[0][1] == "mine" and len(set(ids[0])) == 4
    assert ids[2][1] == "mine" and not (set(ids[2]) - {"mine"}) & set(ids[0])
    assert "task_id" not in callbacks[0].options and "task_id" not in fan_out.tasks[0].options
    assert json.loads(dumps(first.callbacks))  # still a message's signatures
