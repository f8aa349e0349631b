"""Keep a worker's event loop from sleeping while callbacks are ready to run.

Kombu's event loop (``kombu.asynchronous.Hub.create_loop``) runs, on every turn,
the callbacks queued with ``call_soon``, then the due timers, then waits for its
sockets with ``poll(timeout)``, where the timeout is the time to the next timer,
up to ten seconds. A callback queued by the loop's own thread while it runs the
first batch (Celery queues every task acknowledgement that way) waits for the next
turn, and nothing shortens the wait before it: ``call_soon`` wakes the loop only
when called from another thread. In a worker running late-acknowledged tasks, once
every prefetched message has run, the broker sends nothing until it gets their
acknowledgements, and those sit in the loop's queue: the worker stalls until the
next timer, up to ten seconds, with messages waiting (see docs/design.md, "The
event-loop stall", for the evidence and the report drafted for kombu).

:class:`ReadyAwarePoll` is a worker bootstep that wraps the loop's poller so that
a poll made while callbacks are queued does not wait. It changes nothing else: the
loop still runs every queued callback on its next turn, in its own order.

The same wait delays a warm shutdown: a signal that arrives while the loop polls
does not end the poll (Python retries an interrupted ``epoll_wait``, PEP 475), so
Celery's handler, which asks the loop to stop, is seen only when the poll returns,
up to ten seconds later; an idle ``-P solo`` worker took ten seconds to stop on
``SIGTERM``. The wrapped poller also watches a pipe given to
:func:`signal.set_wakeup_fd`, so a signal ends the poll at once (only where no
other wakeup file descriptor is set; forked children drop it).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger

__all__ = ["ReadyAwarePoll", "install"]

logger = get_logger(__name__)

#: What the workaround needs of kombu's Hub; checked before it is installed.
_NEEDED = ("_ready", "_poller", "_create_poller")


#: The read end of the pipe signals are written to (``signal.set_wakeup_fd``), once made.
_wakeup_fd: int | None = None


def _signal_wakeup() -> int | None:
    """The read end of a pipe that every signal to this process writes a byte to.

    Made once, from the main thread, and only if nothing else set a wakeup file
    descriptor (an asyncio loop, say); None otherwise.
    """
    global _wakeup_fd
    if _wakeup_fd is not None:
        return _wakeup_fd
    if threading.current_thread() is not threading.main_thread():
        return None
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:  # someone else's: leave it
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return None
    _wakeup_fd = read
    return read


def _forget_wakeup_in_child() -> None:
    # A forked child (a pool process) runs no hub: its signals must not wake the parent's.
    global _wakeup_fd
    if _wakeup_fd is not None:
        signal.set_wakeup_fd(-1)
        _wakeup_fd = None


os.register_at_fork(after_in_child=_forget_wakeup_in_child)


class _Poller:
    """A hub's poller whose ``poll`` does not wait while the hub has callbacks ready,
    nor after a signal arrived."""

    def __init__(self, poller: Any, hub: Any) -> None:
        self._poller = poller
        self._hub = hub
        self._wakeup = _signal_wakeup()
        if self._wakeup is not None:
            poller.register(self._wakeup, hub.READ)

    def poll(self, timeout: float | None) -> Any:
        """Wait for events up to ``timeout`` seconds, or not at all if callbacks are queued."""
        events = self._poller.poll(0 if self._hub._ready else timeout)
        if self._wakeup is None or not events:
            return events
        kept = [event for event in events if event[0] != self._wakeup]
        if len(kept) != len(events):
            try:
                while os.read(self._wakeup, 512):
                    pass
            except BlockingIOError:
                pass
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    def __bool__(self) -> bool:
        return True


def install(hub: Any) -> bool:
    """Wrap ``hub``'s poller, now and whenever the hub makes a new one (``Hub.reset``).

    Returns False, after logging a warning, when this kombu's hub lacks what the
    workaround needs; the loop then keeps kombu's behaviour.
    """
    if getattr(hub, "_celery_idem_ready_aware", False):
        return True
    missing = [name for name in _NEEDED if not hasattr(hub, name)]
    if missing:
        logger.warning(
            "celery-idem: this kombu's event loop has no %s; a worker may stall for up to 10 s "
            "between late-acknowledged tasks (see celery_idem.eventloop)",
            ", ".join(missing),
        )
        return False
    create_poller = hub._create_poller

    def create_ready_aware_poller() -> None:
        create_poller()
        hub._poller = _Poller(hub._poller, hub)

    hub._create_poller = create_ready_aware_poller
    if hub._poller is not None and not isinstance(hub._poller, _Poller):
        hub._poller = _Poller(hub._poller, hub)
    hub._celery_idem_ready_aware = True
    return True


class ReadyAwarePoll(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: install :func:`install` on the worker's event loop once it exists."""

    name = "celery_idem.ReadyAwarePoll"
    requires = ("celery.worker.components:Hub",)

    def include_if(self, worker: Any) -> bool:
        """Only workers that run kombu's event loop (not under gevent or eventlet)."""
        return bool(getattr(worker, "use_eventloop", False))

    def create(self, worker: Any) -> None:
        """Wrap the poller of the hub the ``Hub`` step just made."""
        if worker.hub is not None:
            install(worker.hub)
