"""SIGKILLs ``charge_order`` bodies at chosen moments, and one whole worker, for "killed mid-task".

The bodies report where they are (:func:`example_project.monitoring.trace`, with
``EXAMPLE_TRACE=1``): ``started``, ``in transaction`` (the charge row written, not
committed), ``charged`` (committed) and ``returning``. The killer reads the reports
and picks bodies evenly among the scenario's orders as they start. Each picked body
is killed at the next of four moments in turn, at a random point inside it:

* ``before``: in the provider call before the transaction;
* ``inside``: in the transaction, after the row was written, before it commits;
* ``after``: in the provider call after the transaction, before the body returns;
* ``at return``: as the body returns, before (or while) its result is recorded.

Each moment is aimed from the report that opens it, with a random delay shorter
than the shortest span the body spends there, so that the kill lands in it; the
last two land after the effect and before the message is acknowledged, which
makes a plain task run the charge again. Once half the kills are done, the worker
of the next body to report ``charged`` is killed whole (main process and pool).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import redis

from example_project import settings
from example_project.demo.workers import WorkerProcess
from example_project.monitoring import TRACE_KEY

#: Each moment: the report that opens it, and the longest delay after that report
#: (seconds) that still lands inside it (the shortest span the body stays there).
MOMENTS = {
    "before": ("started", 0.02),  # the provider call takes 25-100 ms
    "inside": ("in transaction", 0.008),  # the bookkeeping takes 10-30 ms
    "after": ("charged", 0.02),  # the provider call takes 25-100 ms
    "at return": ("returning", 0.0),
}


class Killer(threading.Thread):
    """Kills ``kills`` bodies of ``orders`` (each order at most once) and one whole worker."""

    def __init__(
        self, redis_url: str, orders: Collection[int], kills: int, workers: Sequence[WorkerProcess]
    ) -> None:
        super().__init__(name="killer", daemon=True)
        self.events = redis.Redis.from_url(redis_url, decode_responses=True)
        self.key = TRACE_KEY.format(queue=settings.QUEUE)
        self.orders = set(orders)
        self.wanted = min(kills, len(self.orders))
        self.workers = workers
        #: Pool processes killed, by the moment aimed at.
        self.killed: Counter[str] = Counter()
        #: Each kill of a pool process: order id and moment.
        self.victims: list[tuple[int, str]] = []
        #: The worker killed whole: hostname and pid; set once it is dead.
        self.worker: dict[str, Any] = {}
        self.worker_killed = threading.Event()
        self._seen: set[int] = set()
        self._picked = 0
        self._aimed: dict[tuple[int, int], str] = {}  # (pid, order) -> moment
        self._where: dict[int, int] = {}  # pid -> order it runs now
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    @property
    def kills(self) -> int:
        return sum(self.killed.values())

    def clear(self) -> None:
        """Drop reports of earlier scenarios; call before the scenario sends anything."""
        self.events.delete(self.key)

    def run(self) -> None:
        while not self._done.is_set():
            item = self.events.blpop([self.key], timeout=0.5)
            if item is not None:
                self._on_report(json.loads(item[1]))

    def stop(self) -> None:
        self._done.set()
        self.join(10)
        with self._lock:
            for timer in self._timers:
                timer.cancel()
        self.events.close()

    def _on_report(self, report: dict[str, Any]) -> None:
        order, pid, phase = report["order_id"], report["pid"], report["phase"]
        if order not in self.orders or self._worker_of(report) is None:
            return  # not this scenario's, or of a worker that is gone
        with self._lock:
            self._where[pid] = order
        if phase == "started" and order not in self._seen:
            self._seen.add(order)
            # Spread the kills evenly over the orders, in the order they start.
            n = len(self._seen)
            if self._picked < self.wanted and n * self.wanted // len(self.orders) > self._picked:
                self._aimed[(pid, order)] = list(MOMENTS)[self._picked % len(MOMENTS)]
                self._picked += 1
        moment = self._aimed.get((pid, order))
        if moment is not None and MOMENTS[moment][0] == phase:
            del self._aimed[(pid, order)]
            delay = random.uniform(0, MOMENTS[moment][1])
            if delay:
                timer = threading.Timer(delay, self._kill, (pid, order, moment))
                with self._lock:
                    self._timers.append(timer)
                timer.start()
            else:
                self._kill(pid, order, moment)
        elif phase == "charged" and not self.worker and self.kills >= self.wanted // 2:
            self._kill_worker(report)

    def _kill(self, pid: int, order: int, moment: str) -> None:
        with self._lock:
            if self._done.is_set() or self._where.get(pid) != order:
                return  # the body is over and the process runs another
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.killed[moment] += 1
            self.victims.append((order, moment))

    def _kill_worker(self, report: dict[str, Any]) -> None:
        worker = self._worker_of(report)
        assert worker is not None
        self.worker = {"hostname": worker.hostname, "pid": worker.pid, "order_id": report["order_id"]}
        with self._lock:
            worker.kill()
        self.worker_killed.set()

    def _worker_of(self, report: dict[str, Any]) -> WorkerProcess | None:
        return next((w for w in self.workers if w.pid is not None and w.pid == report["ppid"]), None)
