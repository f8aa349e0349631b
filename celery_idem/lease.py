"""Leases held by this process, and the one thread that keeps them alive.

A lease is short (``idempotency_lock_ttl``) so that the key of a crashed worker is
taken over quickly; a live run keeps its lease by renewal. One daemon thread per
process renews every lease the process holds, all of one Redis server in a single
pipelined round trip, every third of the shortest lease held: a lease survives two
missed renewals. A renewal that finds the lease gone marks it lost; the run then
cannot commit (the commit script checks the fencing token), and the body can look at
``self.idempotency.lost`` to stop early.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

from celery.utils.log import get_logger
from redis.exceptions import RedisError

from .errors import describe_error
from .store import RecordStore

__all__ = ["Lease", "Renewer", "renewer", "reset_renewer"]

logger = get_logger(__name__)


class Lease:
    """The lease of one run: its record key and fencing token."""

    __slots__ = ("keep_ms", "key", "lease_ms", "lost", "settled", "store", "task", "token")

    def __init__(
        self, store: RecordStore, key: str, token: int, lease_ms: int, keep_ms: int, task: str = ""
    ) -> None:
        self.store = store
        #: The task's name, under which the scripts count.
        self.task = task
        #: The Redis key of the record.
        self.key = key
        #: The fencing token of this run: higher than any earlier run of this key.
        self.token = token
        self.lease_ms = lease_ms
        self.keep_ms = keep_ms
        #: True once a renewal found that another run holds (or finished) the key.
        self.lost = False
        #: Set once the run committed or released, so nothing is sent twice.
        self.settled = False

    def __repr__(self) -> str:
        return f"<Lease {self.key} token={self.token}{' lost' if self.lost else ''}>"


class Renewer:
    """Renews the leases of this process from one daemon thread.

    The thread renews every lease it holds at each tick, a third of the shortest
    lease apart. A lease handed over between ticks waits for the next one (it was
    just acquired, with a whole lease ahead), so handing over a lease wakes the
    thread only when that lease needs an earlier tick than the one planned: a
    stream of short tasks costs one wake-up, and at most one renewal, per tick.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._thread: threading.Thread | None = None
        self._next_tick: float | None = None
        self._pid = os.getpid()

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive until :meth:`drop` is called."""
        due = time.monotonic() + lease.lease_ms / 3000
        with self._cond:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-idem-renewer", daemon=True)
                self._thread.start()
            if self._next_tick is None or due < self._next_tick:
                self._next_tick = due
                self._cond.notify()

    def drop(self, lease: Lease) -> None:
        """Stop renewing ``lease``."""
        with self._cond:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._next_tick is None:
                        self._cond.wait()
                        continue
                    delay = self._next_tick - time.monotonic()
                    if delay > 0:
                        self._cond.wait(delay)
                    elif self._leases:
                        break
                    else:
                        # Nothing held at this tick: sleep until the next hold.
                        self._next_tick = None
                held = list(self._leases)
                self._next_tick = time.monotonic() + min(lease.lease_ms for lease in held) / 3000
            try:
                self.renew(held)
            except Exception:  # the thread must outlive any one failed tick
                logger.exception("celery-idem: lease renewal failed")

    def renew(self, leases: list[Lease]) -> None:
        """Renew ``leases`` now: one round trip per Redis server."""
        by_store: dict[RecordStore, list[Lease]] = defaultdict(list)
        for lease in leases:
            by_store[lease.store].append(lease)
        for store, group in by_store.items():
            try:
                held = store.renew(
                    [(lease.key, lease.token, lease.lease_ms, lease.keep_ms, lease.task) for lease in group]
                )
            except RedisError as exc:
                # Not only outages: an error reply for one key must not stop the
                # renewal of the others on the next tick, nor kill this thread.
                logger.warning(
                    "celery-idem: could not renew %d lease(s) at %s: %s",
                    len(group),
                    store.url,
                    describe_error(exc),
                )
                continue
            for lease, still_held in zip(group, held):
                # A run drops its lease before committing or releasing it, so a
                # lease no longer held here was given up, not lost.
                with self._cond:
                    given_up = lease not in self._leases
                if not still_held and not given_up and not lease.lost:
                    lease.lost = True
                    logger.warning(
                        "celery-idem: lost the lease on %s (token %d); this run will not be recorded",
                        lease.key,
                        lease.token,
                    )


_renewer = Renewer()


def renewer() -> Renewer:
    """Return this process's renewer (a new one after a fork)."""
    global _renewer
    if _renewer._pid != os.getpid():
        _renewer = Renewer()
    return _renewer


def reset_renewer() -> None:
    """Start afresh in a forked child: the parent's thread does not exist here."""
    global _renewer
    _renewer = Renewer()
