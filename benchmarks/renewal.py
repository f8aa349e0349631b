"""Lease renewal cost: with 1, 10 and 100 tasks running at once, and per task.

The tasks are real ``IdempotentTask`` deliveries (``task.apply`` in N threads of this
process, as a ``-P threads`` worker would run them) whose bodies block until the
measurement is over. While all N hold their leases, the benchmark counts, over a
window of several renewal intervals, the round trips of celery_idem's renewal
thread (one pipelined request per Redis server per interval is the design), the
EVALSHA calls the records server received, and how long each renewal took.

Handing each lease to the renewal thread and taking it back also costs every task
something, renewals or not; the second table measures that, by timing the same
idempotent tasks with and without the hand-over (``task.apply`` in a loop, the
variants alternating).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from kombu.utils.uuid import uuid

import celery_idem.delivery
from celery_idem import IdempotentTask
from celery_idem.lease import Lease, renewer, reset_renewer
from celery_idem.store import reset_stores

from .counting import CountingConnection, round_trips
from .harness import Options, Servers, command_delta, command_stats, median
from .report import Table

NAME = "renewal"
TITLE = "Lease renewal cost"

#: Lease length; the renewal thread renews every third of it.
LOCK_TTL = 0.6


def measure(servers: Servers, running: int, window: float) -> dict[str, Any]:
    """Hold ``running`` leases for ``window`` seconds and count what renewing them cost."""
    reset_stores()
    reset_renewer()
    app = Celery("bench-renewal", set_as_current=False)
    app.conf.update(
        idempotency_redis_url=servers.url("records"),
        idempotency_redis_options={"connection_class": CountingConnection},
        idempotency_lock_ttl=LOCK_TTL,
        task_ignore_result=True,
    )
    started = threading.Semaphore(0)
    gate = threading.Event()

    @app.task(base=IdempotentTask, shared=False, name="bench.held")
    def held(i: int) -> None:
        started.release()
        gate.wait(300)

    ticks: list[tuple[int, float, int]] = []
    the_renewer = renewer()
    renew = the_renewer.renew

    def timed_renew(leases: list[Any]) -> None:
        sent, start = round_trips()["renewer"], time.perf_counter()
        renew(leases)
        if leases:
            ticks.append((len(leases), time.perf_counter() - start, round_trips()["renewer"] - sent))

    the_renewer.renew = timed_renew  # type: ignore[method-assign]
    threads = [
        threading.Thread(target=held.apply, args=((i,),), kwargs={"task_id": uuid()}, daemon=True)
        for i in range(running)
    ]
    try:
        for thread in threads:
            thread.start()
        for _ in range(running):
            if not started.acquire(timeout=60):
                raise RuntimeError(f"only some of {running} tasks started")
        # Start counting after a first renewal of all N: it may load the script.
        deadline = time.monotonic() + 10 * LOCK_TTL
        while not (ticks and ticks[-1][0] == running) and time.monotonic() < deadline:
            time.sleep(0.01)
        records = servers.client("records")
        commands, trips, first_tick = command_stats(records), round_trips(), len(ticks)
        time.sleep(window)
        commands = command_delta(commands, command_stats(records))
        trips = {role: count - trips[role] for role, count in round_trips().items()}
        window_ticks = ticks[first_tick:]
    finally:
        gate.set()
        for thread in threads:
            thread.join(60)
        reset_stores()
        reset_renewer()
        servers.flush("records")
    return {
        "intervals": window / (LOCK_TTL / 3),
        "renewer": trips["renewer"],
        "task": trips["task"],
        "evalsha": commands.get("evalsha", 0),
        "tick_ms": median(d for _, d, _ in window_ticks) * 1000 if window_ticks else float("nan"),
        "trips_per_tick": median(t for _, _, t in window_ticks) if window_ticks else float("nan"),
        "leases_per_tick": median(n for n, _, _ in window_ticks) if window_ticks else 0,
    }


class _NoRenewal:
    """Takes leases and renews none: what a task costs without the renewal thread."""

    def hold(self, lease: Lease) -> None:
        pass

    def drop(self, lease: Lease) -> None:
        pass


@contextlib.contextmanager
def _without_renewal() -> Iterator[None]:
    # An experiment, not a configuration: celery_idem.delivery asks lease.renewer()
    # for the renewal thread on every run.
    namespace = vars(celery_idem.delivery)
    original = namespace["renewer"]
    namespace["renewer"] = _NoRenewal
    try:
        yield
    finally:
        namespace["renewer"] = original


def per_task_cost(servers: Servers, block: int, blocks: int) -> Table:
    """Time blocks of ``block`` eager no-op tasks, the variants alternating block by block.

    The machine's speed drifts from minute to minute by more than the effect measured
    here, so the hand-over's cost is the median over blocks of the difference between
    neighbouring blocks with and without it.
    """
    reset_stores()
    reset_renewer()
    app = Celery("bench-renewal-cost", set_as_current=False)
    app.conf.update(idempotency_redis_url=servers.url("records"), task_ignore_result=True)

    @app.task(shared=False, name="bench.plain", acks_late=True)
    def plain(i: int) -> None:
        pass

    @app.task(base=IdempotentTask, shared=False, name="bench.idem_id")
    def idem(i: int) -> None:
        pass

    def timed(task: Any) -> float:
        start = time.perf_counter()
        for i in range(block):
            task.apply((i,), task_id=uuid())
        return (time.perf_counter() - start) / block * 1e6

    timed(plain), timed(idem)  # connect, load the scripts, start the renewal thread
    samples: dict[str, list[float]] = {"plain": [], "idem": [], "bare": []}
    try:
        for _ in range(blocks):
            samples["plain"].append(timed(plain))
            samples["idem"].append(timed(idem))
            with _without_renewal():
                samples["bare"].append(timed(idem))
    finally:
        reset_stores()
        reset_renewer()
        servers.flush("records")
    differences = sorted(a - b for a, b in zip(samples["idem"], samples["bare"]))
    quarter = len(differences) // 4
    table = Table(
        f"What handing leases to the renewal thread costs per task ({blocks} blocks of {block} eager "
        "no-op tasks per variant, alternating)",
        ["", "µs per task, median"],
    )
    table.add("plain `celery.Task`, `task.apply`", f"{median(samples['plain']):,.0f}")
    table.add("`IdempotentTask` (key = task id), `task.apply`", f"{median(samples['idem']):,.0f}")
    table.add(
        "the same, leases not handed to the renewal thread (experiment)", f"{median(samples['bare']):,.0f}"
    )
    table.add(
        "cost of the hand-over: difference of neighbouring blocks",
        f"{median(differences):,.0f} (quartiles {differences[quarter]:,.0f} to {differences[-quarter - 1]:,.0f})",
    )
    table.notes.append(
        "the experiment replaces `celery_idem.delivery.renewer` by an object whose hold and drop do nothing; "
        "the tasks run no body and renew nothing either way, so the difference is the thread's wake-ups "
        "and its locking"
    )
    return table


def run(options: Options, servers: Servers) -> list[Table]:
    window = 1.0 if options.quick else 4.0
    interval = LOCK_TTL / 3
    print(f"{TITLE}: 1, 10, 100 running tasks, {window:.0f} s each")
    table = Table(
        f"Lease renewal with N running tasks in one process (lease {LOCK_TTL} s, "
        f"renewed every {interval:.1f} s, {window / interval:.0f} intervals measured)",
        [
            "running tasks",
            "renewal round trips / interval",
            "round trips / renewal, median",
            "leases / renewal",
            "EVALSHA / interval",
            "renewal time, median",
            "task-thread round trips in the window",
            "target",
        ],
    )
    for running in (1, 10, 100):
        m = measure(servers, running, window)
        table.add(
            running,
            f"{m['renewer'] / m['intervals']:.2f}",
            f"{m['trips_per_tick']:.0f}",
            f"{m['leases_per_tick']:.0f}",
            f"{m['evalsha'] / m['intervals']:.1f}",
            f"{m['tick_ms']:.2f} ms",
            m["task"],
            "1 round trip / renewal, 1 renewal / interval",
        )
    table.notes.append(
        "tasks run with `task.apply` in N threads of the benchmark process; their bodies block "
        "until the window is over"
    )
    table.notes.append(
        "round trips counted by the records client per thread; EVALSHA from `INFO commandstats`; "
        "renewal time: one call of the renewer's `renew` for all leases, timed"
    )
    return [table, per_task_cost(servers, 200, 8 if options.quick else 40)]
