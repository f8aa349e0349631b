"""Recovery from crashes in seconds: the key of a dead run is freed, duplicates come back promptly.

A pool process killed mid-task: the worker's main process frees the run's key as it
learns of the death, so the redelivery of the message takes over at once, whatever
the key strategy, and the order completes within 2 s of the kill. A whole worker
killed (main process too): the key is taken over when its lease runs out, and the
order completes within ``idempotency_lock_ttl`` + 2 s, with the library's defaults.
The bounds are recovery targets (the README states them), far below what waiting
out the leases here would take.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from celery_idem.config import DEFAULTS
from tests.helpers import next_report, runs

#: A lease long enough that only the main process's release can explain a fast recovery.
LONG_LEASE = 60


@pytest.mark.parametrize(
    ("task", "send"),
    [
        ("t.by_id", "apply_async"),
        ("t.by_args", "apply_async"),
        ("t.by_label", "send_task"),  # no key header: the main process computes the key
        ("t.by_callable", "apply_async"),
    ],
)
def test_a_killed_pool_process_frees_its_key_and_its_message_runs_again_at_once(
    broker_conf, start_worker, producer, events, task, send
):
    conf = {**broker_conf, "idempotency_lock_ttl": LONG_LEASE}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    label = f"kill-{task}"
    if send == "send_task":
        result = app.send_task(task, (label,), {"hold": "first"})
    else:
        result = app.tasks[task].apply_async((label,), {"hold": "first"})
    victim = next_report(events, "started", label)
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    value = result.get(timeout=LONG_LEASE)
    recovered = time.monotonic() - killed
    assert value["token"] == victim["token"] + 1
    assert runs(events, label) == 2 and int(events.hget("effects", label)) == 1
    assert recovered < 2.0, f"the order completed {recovered:.1f} s after the kill"


def test_a_run_past_its_hard_time_limit_frees_its_key_at_once(broker_conf, start_worker, producer, events):
    conf = {**broker_conf, "idempotency_lock_ttl": LONG_LEASE, "task_time_limit": 1}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    slow = task.apply_async(("limit",), {"hold": "first"})
    next_report(events, "started", "limit")
    with pytest.raises(Exception, match="TimeLimitExceeded"):
        slow.get(timeout=30)
    # A new submission of the same key runs now, not after the 60 s lease.
    assert task.delay("limit", "first").get(timeout=20)["run"] == 2


def test_a_killed_worker_s_order_completes_within_a_lease_with_the_defaults(
    broker_conf, start_worker, producer, events
):
    conf = {
        k: v for k, v in broker_conf.items() if k not in ("idempotency_lock_ttl", "broker_transport_options")
    }
    lease = DEFAULTS["idempotency_lock_ttl"]
    doomed = start_worker(conf, concurrency=1)
    app = producer(conf)
    result = app.tasks["t.by_label"].apply_async(("whole",), {"hold": "first"})
    next_report(events, "started", "whole")
    start_worker(conf, concurrency=1)
    killed = time.monotonic()
    doomed.kill()  # the main process and its pool, as a machine failure would
    value = result.get(timeout=lease * 6)
    recovered = time.monotonic() - killed
    assert value["run"] == 2 and int(events.hget("effects", "whole")) == 1
    assert recovered < lease + 2.0, f"the order completed {recovered:.1f} s after the kill"


def test_a_duplicate_waiting_for_a_live_holder_comes_back_within_a_second_of_its_end(
    broker_conf, start_worker, producer, events
):
    conf = {**broker_conf, "idempotency_lock_ttl": LONG_LEASE}
    start_worker(conf, concurrency=2)
    app = producer(conf)
    task = app.tasks["t.by_label"]
    holder = task.apply_async(("long",), {"hold": "gate"})
    next_report(events, "started", "long")
    duplicate = task.apply_async(("long",), {"hold": "gate"})
    # Several re-queues pass while the holder runs (its back-off would have grown to the lease).
    for _ in range(4):
        assert events.blpop(["retried:long"], timeout=30) is not None
    events.rpush("gate:long", "1")
    first = holder.get(timeout=30)
    finished = time.monotonic()
    assert duplicate.get(timeout=30) == first
    assert time.monotonic() - finished < 1.5
