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
from collections import defaultdict

from celery.utils.log import get_logger
from redis.exceptions import RedisError

from .store import RecordStore, describe_error

__all__ = ["Lease", "Renewer", "renewer", "reset_renewer"]

logger = get_logger(__name__)


class Lease:
    """The lease of one run: its record key and fencing token."""

    __slots__ = ("_lost", "keep_ms", "key", "lease_ms", "settled", "store", "token")

    def __init__(self, store: RecordStore, key: str, token: int, lease_ms: int, keep_ms: int) -> None:
        self.store = store
        #: The Redis key of the record.
        self.key = key
        #: The fencing token of this run: higher than any earlier run of this key.
        self.token = token
        self.lease_ms = lease_ms
        self.keep_ms = keep_ms
        self._lost = threading.Event()
        #: Set once the run committed or released, so nothing is sent twice.
        self.settled = False

    @property
    def lost(self) -> bool:
        """True once a renewal found that another run holds (or finished) the key."""
        return self._lost.is_set()

    def mark_lost(self) -> None:
        """Record that this run no longer holds the key."""
        self._lost.set()

    def __repr__(self) -> str:
        return f"<Lease {self.key} token={self.token}{' lost' if self.lost else ''}>"


class Renewer:
    """Renews the leases of this process from one daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._leases: set[Lease] = set()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive until :meth:`drop` is called."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="celery-idem-renewer", daemon=True)
                self._thread.start()
            shortest = min((held.lease_ms for held in self._leases), default=None)
            self._leases.add(lease)
            if shortest is None or lease.lease_ms < shortest:
                self._cond.notify()

    def drop(self, lease: Lease) -> None:
        """Stop renewing ``lease``."""
        with self._cond:
            self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._leases:
                    self._cond.wait()
                interval = min(lease.lease_ms for lease in self._leases) / 3000
                self._cond.wait(interval)
                held = list(self._leases)
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
                    [(lease.key, lease.token, lease.lease_ms, lease.keep_ms) for lease in group]
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
                    lease.mark_lost()
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
