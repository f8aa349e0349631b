"""The atomic-fetch Redis transport: a worker dying while it fetches loses nothing."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import redis
from celery import Celery
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_idem.broker import TESTED_KOMBU, Transport, fallback_reason
from celery_idem.config import atomic_fetch_transport

QUEUE = Queue("jobs", Exchange("jobs"), "jobs")


def publish(url: str, *bodies: dict) -> None:
    with Connection(url) as connection:
        producer = Producer(connection.channel(), exchange=QUEUE.exchange, routing_key="jobs")
        QUEUE(producer.channel).declare()
        for body in bodies:
            producer.publish(body)


def _die_right_after_fetching(url: str, transport: str | None) -> None:
    # The consumer is killed at the worst moment: the message has left its queue
    # and is about to be handed over. Kombu records it as unacknowledged in its
    # QoS.append, so that is where kombu's own consumer dies; celery_idem's recorded
    # it while fetching, and dies as it starts tracking the message in memory.
    import os

    from kombu.transport import redis as kombu_redis
    from kombu.transport import virtual as kombu_virtual

    def die(self, message, tag):
        os._exit(9)

    if transport is None:
        kombu_redis.QoS.append = die
    else:
        kombu_virtual.QoS.append = die
    with Connection(url, transport=transport) as connection:
        with Consumer(connection, [QUEUE], callbacks=[lambda body, message: None]):
            connection.drain_events(timeout=10)


def crash_while_fetching(url: str, transport: str | None) -> None:
    process = multiprocessing.get_context("spawn").Process(
        target=_die_right_after_fetching, args=(url, transport)
    )
    process.start()
    process.join(30)
    assert process.exitcode == 9


def receive_one(url: str, transport: str | None) -> dict | None:
    received = []
    with Connection(url, transport=transport) as connection:
        with Consumer(
            connection, [QUEUE], callbacks=[lambda body, message: (received.append(body), message.ack())]
        ):
            try:
                connection.drain_events(timeout=5)
            except socket.timeout:  # TimeoutError from Python 3.10, a subclass of OSError before
                pass
    return received[0] if received else None


def test_kombus_own_fetch_loses_a_message_when_the_consumer_dies_while_fetching(redis_url, events):
    # The hazard this transport exists for, shown on kombu's own transport.
    publish(redis_url, {"n": 1})
    crash_while_fetching(redis_url, None)
    assert events.llen("jobs") == 0 and events.hlen("unacked") == 0


def test_a_message_fetched_by_a_dying_consumer_is_delivered_again(redis_url, events):
    transport = "celery_idem.broker:Transport"
    publish(redis_url, {"n": 1})
    crash_while_fetching(redis_url, transport)
    assert events.llen("jobs") == 0 and events.hlen("unacked") == 1
    # Workers restore unacknowledged messages older than the visibility timeout.
    with Connection(
        redis_url, transport=transport, transport_options={"visibility_timeout": 0}
    ) as connection:
        connection.channel().qos.restore_visible()
    assert receive_one(redis_url, transport) == {"n": 1}
    assert events.hlen("unacked") == 0


def test_messages_arrive_in_order_and_are_acknowledged(redis_url, events):
    transport = "celery_idem.broker:Transport"
    publish(redis_url, *({"n": n} for n in range(20)))
    received = []
    with Connection(redis_url, transport=transport) as connection:
        channel = connection.channel()
        assert isinstance(connection.transport, Transport)
        with Consumer(
            channel, [QUEUE], callbacks=[lambda body, message: (received.append(body["n"]), message.ack())]
        ):
            while len(received) < 20:
                connection.drain_events(timeout=5)
    assert received == list(range(20))
    assert events.hlen("unacked") == 0 and events.zcard("unacked_index") == 0


def test_an_idle_consumer_wakes_up_for_a_new_message(redis_url, events):
    transport = "celery_idem.broker:Transport"
    publish(redis_url)  # declares the queue
    received = []
    with Connection(redis_url, transport=transport) as connection:
        with Consumer(
            connection, [QUEUE], callbacks=[lambda body, message: (received.append(body), message.ack())]
        ):
            with pytest.raises(socket.timeout):
                connection.drain_events(timeout=0.5)  # nothing there: it waits
            publish(redis_url, {"n": "late"})
            connection.drain_events(timeout=5)
    assert received == [{"n": "late"}]


def test_basic_get_fetches_atomically_too(redis_url, events):
    publish(redis_url, {"n": 1})
    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        message = connection.channel().basic_get("jobs")
        assert message.payload == {"n": 1}
        assert events.hlen("unacked") == 1
        message.ack()
    assert events.hlen("unacked") == 0


def test_the_fetch_script_is_reloaded_after_a_script_flush(redis_url, events):
    transport = "celery_idem.broker:Transport"
    publish(redis_url, {"n": 1}, {"n": 2})
    assert receive_one(redis_url, transport) == {"n": 1}
    redis.Redis.from_url(redis_url).script_flush()
    assert receive_one(redis_url, transport) == {"n": 2}


def test_basic_get_reloads_the_fetch_script_after_a_script_flush(redis_url, events):
    publish(redis_url, {"n": 1}, {"n": 2})
    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        channel = connection.channel()
        channel.basic_get("jobs").ack()
        redis.Redis.from_url(redis_url).script_flush()
        message = channel.basic_get("jobs")
        assert message.payload == {"n": 2}
        assert events.hlen("unacked") == 1  # fetched by the script, recorded as unacknowledged
        message.ack()


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"broker_url": "redis://localhost:6379/0"}, "celery_idem.broker:Transport"),
        ({"broker_url": "rediss://localhost:6379/0"}, "celery_idem.broker:Transport"),
        ({"broker_url": "amqp://guest@localhost//"}, None),
        ({"broker_url": "sentinel://localhost:26379"}, None),
        ({"broker_url": "redis://localhost:6379/0", "broker_transport": "redis"}, None),
        ({"broker_url": "redis://localhost:6379/0", "idempotency_atomic_redis_fetch": False}, None),
    ],
)
def test_workers_of_redis_broker_apps_use_the_atomic_fetch_unless_told_otherwise(conf, expected):
    app = Celery("b", set_as_current=False)
    app.conf.update(conf)
    assert atomic_fetch_transport(app) == expected


def test_every_kombu_minor_in_the_tested_range_uses_the_transport():
    first, last = TESTED_KOMBU
    for minor in range(first[1], last[1] + 1):
        assert fallback_reason(f"{first[0]}.{minor}.0") is None
    assert fallback_reason() is None  # the installed kombu


@pytest.mark.parametrize(
    ("version", "says"),
    [
        (
            "5.8.0",
            "kombu 5.8.0 is outside the versions celery_idem's broker transport was tested with (5.3 to 5.7)",
        ),
        ("5.2.4", "kombu 5.2.4 is outside the versions"),
        ("6.0.0", "kombu 6.0.0 is outside the versions"),
        ("main", "kombu main is not a release version"),
    ],
)
def test_a_kombu_outside_the_tested_range_keeps_kombus_fetch_and_says_why(version, says):
    reason = fallback_reason(version)
    assert reason is not None and reason.startswith(says)


def test_a_kombu_channel_without_a_method_the_transport_extends_keeps_kombus_fetch():
    from kombu.transport import redis as kombu_redis

    # Kombu's channel as a later kombu might have it: one private method renamed.
    renamed = type(
        "Channel", (), {name: getattr(kombu_redis.Channel, name) for name in dir(kombu_redis.Channel)}
    )
    del renamed._brpop_read
    assert fallback_reason("5.7.0", renamed) == "kombu 5.7.0's Redis channel has no _brpop_read"


def fetch_lines(log: str) -> tuple[list[str], list[str]]:
    """The worker's lines saying how it fetches: (INFO lines, WARNING lines)."""
    said = [line for line in log.splitlines() if "celery-idem: fetching messages with" in line]
    return [line for line in said if "INFO/" in line], [line for line in said if "WARNING/" in line]


def held_task(app, events, label):
    """Send a task whose body holds its message until :func:`finish_and_replay` opens its gate."""
    from tests.helpers import next_report

    result = app.tasks["t.by_id"].apply_async((label,), {"hold": "gate"}, task_id=f"id-{label}")
    next_report(events, "started", label)
    return result


def finish_and_replay(app, events, label, result):
    """Let the held task finish, then deliver it again: the duplicate returns the first run's result."""
    from tests.helpers import runs

    events.rpush(f"gate:{label}", "open")
    report = result.get(timeout=60)
    assert app.tasks["t.by_id"].apply_async((label,), task_id=f"id-{label}").get(timeout=60) == report
    assert runs(events, label) == 1


def test_a_worker_with_a_tested_kombu_fetches_through_the_atomic_transport(
    start_worker, producer, worker_conf, events
):
    worker = start_worker(worker_conf)
    app = producer()
    broker = redis.Redis.from_url(worker_conf["broker_url"])
    result = held_task(app, events, "tested")
    assert broker.hlen("celery_idem.unacked_owners") == 1  # recorded by fetch.lua
    assert broker.keys("celery_idem.consumer.*")  # the consumer's heartbeat
    finish_and_replay(app, events, "tested", result)
    infos, warnings = fetch_lines(worker.log())
    assert len(infos) == 1 and infos[0].endswith(
        "celery-idem: fetching messages with celery_idem.broker:Transport"
    )
    assert warnings == []


def test_a_worker_with_an_untested_kombu_keeps_kombus_fetch_with_one_warning_and_stays_idempotent(
    start_worker, producer, worker_conf, events
):
    from tests.kombu_next_minor_app import NEXT_MINOR

    worker = start_worker(worker_conf, app="tests.kombu_next_minor_app")
    app = producer()
    broker = redis.Redis.from_url(worker_conf["broker_url"])
    result = held_task(app, events, "untested")
    assert broker.hlen("unacked") == 1  # kombu's own bookkeeping of the message
    assert broker.hlen("celery_idem.unacked_owners") == 0
    assert broker.keys("celery_idem.consumer.*") == []
    finish_and_replay(app, events, "untested", result)
    infos, warnings = fetch_lines(worker.log())
    assert infos == []
    assert len(warnings) == 1
    assert warnings[0].endswith(
        f"celery-idem: fetching messages with kombu's own Redis transport: {fallback_reason(NEXT_MINOR)}; "
        "a worker killed while fetching can lose a message"
    )


def test_a_killed_workers_messages_come_back_without_waiting_for_the_visibility_timeout(
    start_worker, producer, worker_conf, events
):
    from tests.helpers import await_record, next_report, runs

    conf = {
        **worker_conf,
        # Kombu alone would bring the message back after an hour.
        "broker_transport_options": {"visibility_timeout": 3600, "dead_consumer_timeout": 2},
    }
    broker = redis.Redis.from_url(conf["broker_url"])
    doomed = start_worker(conf)
    app = producer(conf)
    result = app.tasks["t.by_id"].apply_async(("dc",), {"hold": "gate"})
    first = next_report(events, "started", "dc")
    assert broker.hlen("celery_idem.unacked_owners") == 1  # who fetched it
    doomed.kill()
    start_worker(conf)
    retaken = next_report(events, "started", "dc")
    assert retaken["token"] == first["token"] + 1
    events.rpush("gate:dc", "open")  # not before: a dead client's BLPOP could still take it
    report = result.get(timeout=60)
    assert report["token"] == retaken["token"]
    assert runs(events, "dc") == 2
    await_record(broker, "celery_idem.unacked_owners", lambda owners: not owners)  # the last ack


def test_a_solo_worker_busy_with_a_long_task_keeps_its_message(start_worker, producer, worker_conf, events):
    # A -P solo worker runs tasks in its event loop, which then cannot beat: the
    # heartbeat thread must, or another worker restores the message mid-run. The
    # task is a plain one, so a restored message would visibly run twice.
    from tests.helpers import next_report, runs

    conf = {
        **worker_conf,
        "broker_transport_options": {"visibility_timeout": 3600, "dead_consumer_timeout": 1},
    }
    solo = start_worker(conf, pool="solo")
    app = producer(conf)
    result = app.tasks["t.plain"].apply_async(("long",), {"hold": 6})  # six timeouts long
    assert next_report(events, "started", "long")["pid"] == solo.process.pid
    start_worker(conf)  # restores the messages of consumers that stop beating
    result.get(timeout=60)
    assert runs(events, "long") == 1


def test_a_channel_beats_from_a_thread_until_it_is_closed(redis_url, events):
    from celery_idem.broker import HEARTBEAT_PREFIX, heartbeats
    from tests.helpers import await_change

    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        channel = connection.channel()
        key = HEARTBEAT_PREFIX + channel.consumer_id
        events.config_set("notify-keyspace-events", "K$")
        pubsub = events.pubsub()
        pubsub.subscribe(f"__keyspace@0__:{key}")
        # The key lives 0.3 s; with no event loop (and not consuming, as a worker
        # shutting down), only the thread renews it: ten beats outlive it.
        heartbeats().add(channel, 0.3)
        beats = 0
        while beats < 10:
            message = pubsub.get_message(timeout=5)
            assert message is not None, f"the heartbeat stopped after {beats} beats"
            beats += message["type"] == "message"
        pubsub.close()
        assert events.exists(key)
        channel.close()
        await_change(events, key, events.exists, lambda exists: not exists)


def test_a_channel_that_starts_beating_in_the_loops_timer_is_kept_beating_by_the_thread(redis_url, events):
    from celery_idem.broker import HEARTBEAT_PREFIX, beat_and_reap

    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        channel = connection.channel()
        with Consumer(channel, [QUEUE], callbacks=[lambda body, message: None]):
            key = HEARTBEAT_PREFIX + channel.consumer_id
            events.config_set("notify-keyspace-events", "K$")
            pubsub = events.pubsub()
            pubsub.subscribe(f"__keyspace@0__:{key}")
            beat_and_reap([channel], timeout=0.3)  # before any fetch, and never again
            beats = 0
            while beats < 10:  # outlives the 0.3 s key: the thread renews it
                message = pubsub.get_message(timeout=5)
                assert message is not None, f"the heartbeat stopped after {beats} beats"
                beats += message["type"] == "message"
            pubsub.close()


def test_live_consumers_keep_their_messages_and_dead_ones_lose_them(redis_url, events):
    from celery_idem.broker import HEARTBEAT_PREFIX, OWNERS_KEY, beat_and_reap

    publish(redis_url, {"n": "live"}, {"n": "dead"})
    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        live = connection.channel()
        with Consumer(live, [QUEUE], callbacks=[lambda body, message: None]):
            beat_and_reap([live], timeout=60)  # starts beating: later fetches record it
            connection.drain_events(timeout=5)  # takes "live"
            dead_tag = "tag-of-a-dead-consumer"
            events.hset(OWNERS_KEY, dead_tag, "gone")
            events.hset("unacked", dead_tag, events.hget("unacked", next(iter(events.hkeys("unacked")))))
            events.zadd("unacked_index", {dead_tag: 0})
            assert events.exists(HEARTBEAT_PREFIX + live.consumer_id)
            beat_and_reap([live], timeout=60)
            assert events.hkeys(OWNERS_KEY) != [dead_tag]
            assert dead_tag not in events.hkeys("unacked")
            assert events.llen("jobs") == 2  # the dead consumer's copy, and "dead" never fetched
            assert events.hlen(OWNERS_KEY) == 1 and events.hlen("unacked") == 1


def test_queues_consumed_without_acknowledgements_are_not_recorded_as_unacknowledged(redis_url, events):
    publish(redis_url, {"n": 1}, {"n": 2})
    received = []
    with Connection(redis_url, transport="celery_idem.broker:Transport") as connection:
        with Consumer(
            connection, [QUEUE], no_ack=True, callbacks=[lambda body, message: received.append(body)]
        ):
            connection.drain_events(timeout=5)
        assert connection.channel().basic_get("jobs", no_ack=True).payload == {"n": 2}
    assert received == [{"n": 1}]
    assert events.hlen("unacked") == 0 and events.hlen("celery_idem.unacked_owners") == 0
