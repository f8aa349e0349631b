"""Many concurrent callers of one key: the body runs once and all get its result."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import runs
from tests.worker_app import make_app

CALLERS = 32


def eager_app(redis_url):
    return make_app(
        {
            "broker_url": "memory://",
            "task_always_eager": True,
            "task_eager_propagates": True,
            "idempotency_redis_url": redis_url,
            "idempotency_on_conflict": "wait",
        }
    )


def test_32_threads_calling_one_key_share_one_run(redis_url, events):
    task = eager_app(redis_url).tasks["t.by_label"]
    barrier = threading.Barrier(CALLERS)

    def call(_):
        barrier.wait()
        return task.delay("threads", hold=0.2).get(disable_sync_subtasks=False)

    with ThreadPoolExecutor(CALLERS) as pool:
        results = list(pool.map(call, range(CALLERS)))
    assert runs(events, "threads") == 1
    assert all(result == results[0] for result in results)


def _call_in_process(redis_url, barrier, results):
    task = eager_app(redis_url).tasks["t.by_label"]
    barrier.wait()
    results.put(task.delay("processes", hold=0.2).get())


def test_32_processes_calling_one_key_share_one_run(redis_url, events):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(CALLERS)
    results = context.Queue()
    processes = [
        context.Process(target=_call_in_process, args=(redis_url, barrier, results)) for _ in range(CALLERS)
    ]
    for process in processes:
        process.start()
    values = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert runs(events, "processes") == 1
    assert all(value == values[0] for value in values)
