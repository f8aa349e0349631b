"""The worker's event loop does not sleep while acknowledgements wait to be sent.

Kombu's loop runs the callbacks queued with ``call_soon``, then polls its sockets
for up to ten seconds; a callback queued by the loop's own thread meanwhile (every
task acknowledgement in Celery) waits for that poll. A late-acknowledged worker
whose prefetched messages have all run then waits, and so does the broker, which
sends nothing more until it gets the acknowledgements: the stall of up to 10 s
described in docs/design.md. These tests show kombu's behaviour, the workaround,
and drains by real workers with no gap between consecutive tasks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.asynchronous import Hub

from celery_idem.eventloop import install

#: A gap between consecutive tasks longer than this is a stall (kombu's loop waits
#: up to 10 s); a detector, far above any pause a healthy drain has.
STALL = 3.0


@pytest.fixture
def hub() -> Iterator[Hub]:
    hub = Hub()
    reader, writer = socket.socketpair()
    # A socket to poll, readable only once the test writes to it to end a wait.
    hub.add_reader(reader, lambda: None)
    hub._test_writer = writer
    hub.call_later(60, lambda: None)  # the next timer is far away: kombu would poll for 10 s
    yield hub
    hub.close()
    reader.close()
    writer.close()


def run_a_callback_queued_by_the_loop(hub: Hub, within: float) -> bool:
    """Queue, from the loop's thread, a callback that queues another; True if both ran in time."""
    ran = threading.Event()
    hub.call_soon(lambda: hub.call_soon(ran.set))
    loop = hub.create_loop()

    def turns() -> None:
        while not ran.is_set():
            next(loop)

    thread = threading.Thread(target=turns, daemon=True)
    thread.start()
    in_time = ran.wait(within)
    hub._test_writer.send(b"x")  # ends a poll still waiting, so the loop thread finishes
    thread.join(15)
    return in_time


def test_kombus_loop_sleeps_with_a_callback_ready(hub: Hub) -> None:
    # The hazard the workaround is for, on kombu's own hub: the callback queued by
    # the first one waits for the poll's timeout.
    assert not run_a_callback_queued_by_the_loop(hub, within=1.0)


def test_a_callback_queued_by_the_loop_runs_without_waiting_for_the_poll(hub: Hub) -> None:
    assert install(hub)
    assert run_a_callback_queued_by_the_loop(hub, within=5.0)


def test_the_workaround_survives_a_reset_of_the_hub(hub: Hub) -> None:
    install(hub)
    hub.reset()  # what Celery's loop does after a connection error: a new poller
    assert run_a_callback_queued_by_the_loop(hub, within=5.0)


def test_install_refuses_a_hub_without_the_internals_it_needs(caplog: pytest.LogCaptureFixture) -> None:
    class Other:
        pass

    assert not install(Other())
    assert "may stall for up to 10 s" in caplog.text


def largest_gap(events: Any) -> float:
    times = sorted(float(t) for t in events.lrange("ticks", 0, -1))
    return max(later - earlier for earlier, later in zip(times, times[1:]))


@pytest.mark.parametrize(
    ("pool", "concurrency", "task", "count"),
    [
        ("solo", 1, "t.tick", 5000),
        ("prefork", 2, "t.tick", 3000),
        ("solo", 1, "t.plain_tick", 3000),
    ],
    ids=["solo", "prefork", "solo-plain-task"],
)
def test_a_drain_has_no_stall_between_tasks(
    broker_conf, start_worker, producer, events, pool, concurrency, task, count
):
    # Late acknowledgement, one message prefetched per process (the test app's
    # setting): the worker waits for nothing but the broker between tasks.
    app = producer(broker_conf)
    sender = app.tasks[task]
    with app.producer_or_acquire() as publisher:
        for _ in range(count):
            sender.apply_async((count,), producer=publisher)
    start_worker(broker_conf, pool=pool, concurrency=concurrency)
    drained = events.blpop(["ticks:drained"], timeout=120)
    assert drained is not None, f"{events.get('ticks:count')} of {count} tasks ran within 120 s"
    assert largest_gap(events) < STALL


def test_an_idle_solo_worker_stops_at_once_on_sigterm(broker_conf, start_worker, producer, events):
    # A signal does not end kombu's poll (Python retries it), so Celery's handler
    # was seen only when the poll returned: an idle worker took 10 s to stop.
    app = producer(broker_conf)
    app.tasks["t.tick"].delay(1)
    worker = start_worker(broker_conf, pool="solo", concurrency=1)
    assert events.blpop(["ticks:drained"], timeout=60) is not None
    assert worker.process is not None
    signalled = time.monotonic()
    os.kill(worker.process.pid, signal.SIGTERM)
    try:
        worker.process.wait(STALL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker was still running {STALL} s after SIGTERM")
    assert time.monotonic() - signalled < STALL
