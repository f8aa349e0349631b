"""A Redis broker transport that never loses a message it fetched.

Kombu's Redis transport takes a message off its queue with ``BRPOP`` and records
it as unacknowledged in a second round trip. A worker killed between the two (a
``SIGKILL``, an OOM kill, a machine failure) takes the message with it: it is in
neither the queue nor the ``unacked`` hash, so nothing ever delivers it again
(kombu and Celery issues document it). For a task that must run once, a lost
message is as bad as a duplicate.

:class:`Transport` is kombu's Redis transport with one change: a message is taken
and recorded as unacknowledged by one Lua script (``lua/fetch.lua``), so at every
instant it is in its queue or in the ``unacked`` hash, from where kombu restores it
after ``visibility_timeout``. Waiting for messages uses ``BLMOVE list list RIGHT
RIGHT``, which blocks until the list has a message and leaves it where it is
(Redis 6.2 or newer); then the script takes it. Everything else (publishing,
acknowledging, restoring, fan-out) is kombu's.

Use it with ``broker_transport = "celery_idem.broker:Transport"``; workers of an app
with a ``redis://`` or ``rediss://`` broker use it by default (the
``idempotency_atomic_redis_fetch`` setting).

Waiting watches one list: the first queue's default-priority list. A message sent
with a priority, or to another of several queues, is noticed at the latest after
``brpop_timeout`` (one second by default) while the worker is idle; a busy worker
fetches without waiting.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from queue import Empty
from time import monotonic, time
from typing import Any

from celery.utils.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

__all__ = ["Channel", "Transport", "supported"]

logger = get_logger(__name__)

_FETCH_SOURCE = resources.files(__package__).joinpath("lua", "fetch.lua").read_text()
_FETCH_SHA = hashlib.sha1(_FETCH_SOURCE.encode()).hexdigest()

#: What the channel sends next on its consumer connection.
_FETCH, _WAIT = "fetch", "wait"

#: Kombu internals this transport builds on; checked before it is used.
_NEEDED = ("_brpop_start", "_brpop_read", "_get", "_q_for_pri", "priority_steps", "unacked_key")


def supported() -> bool:
    """True when the installed kombu has the Redis channel this transport extends."""
    return all(hasattr(kombu_redis.Channel, name) for name in _NEEDED)


class Channel(kombu_redis.Channel):
    """Kombu's Redis channel, fetching each message atomically with its registration."""

    #: The command outstanding on the consumer connection, and the one to send next.
    _sent: str = _FETCH
    _next: str = _FETCH
    _atomic: bool | None = None

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._fetches_atomically():
            super()._brpop_start(timeout)  # type: ignore[no-untyped-call]
            return
        if timeout is None:
            timeout = getattr(self, "brpop_timeout", 1)  # an attribute since kombu 5.4
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        lists = self._lists(queues)
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]  # kombu's stale-wait check
        self._sent = self._next
        if self._sent == _WAIT:
            wait = (timeout or 1) if len(queues) == 1 else min(timeout or 1, 0.2)
            connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait)
        else:
            connection.send_command("EVALSHA", _FETCH_SHA, len(lists) + 2, *self._fetch_args(lists))

    def _brpop_read(self, **options: Any) -> bool:
        if not self._fetches_atomically():
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVALSHA" if self._sent == _FETCH else "BLMOVE", **options
                )
            except NoScriptError:
                self._load_script()
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._sent == _WAIT or not reply:
                # After a wait (a message arrived, or the time ran out), fetch; after a
                # fetch that found nothing, wait.
                self._next = _FETCH if self._sent == _WAIT else _WAIT
                raise Empty()
            self._next = _FETCH
            dest, item = reply
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            self.connection._deliver(loads(bytes_to_str(item)), dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: Any = None) -> Any:
        if not self._fetches_atomically():
            return super()._get(queue)  # type: ignore[no-untyped-call]
        lists = self._lists([queue])
        with self.conn_or_acquire() as client:
            try:
                reply = client.evalsha(_FETCH_SHA, len(lists) + 2, *self._fetch_args(lists))
            except NoScriptError:
                client.script_load(_FETCH_SOURCE)
                reply = client.evalsha(_FETCH_SHA, len(lists) + 2, *self._fetch_args(lists))
        if not reply:
            raise Empty()
        return loads(bytes_to_str(reply[1]))

    def _lists(self, queues: list[str]) -> list[str]:
        return [
            self._q_for_pri(queue, pri)  # type: ignore[no-untyped-call]
            for pri in self.priority_steps
            for queue in queues
        ]

    def _fetch_args(self, lists: list[str]) -> list[Any]:
        return [*lists, self.unacked_key, self.unacked_index_key, time()]

    def _load_script(self) -> None:
        with self.conn_or_acquire() as client:
            client.script_load(_FETCH_SOURCE)

    def _fetches_atomically(self) -> bool:
        if self._atomic is None:
            self._atomic = self._check_server()
        return self._atomic

    def _check_server(self) -> bool:
        if self.global_keyprefix:
            logger.warning(
                "celery-idem: global_keyprefix is set; messages are fetched the usual way, "
                "and a worker killed while fetching can lose one"
            )
            return False
        with self.conn_or_acquire() as client:
            version = str(client.info("server").get("redis_version", "0"))
        major, minor = (int(part) for part in [*version.split("."), "0", "0"][:2])
        if (major, minor) < (6, 2):
            logger.warning(
                "celery-idem: Redis %s has no BLMOVE (6.2+); messages are fetched the usual "
                "way, and a worker killed while fetching can lose one",
                version,
            )
            return False
        return True


class Transport(kombu_redis.Transport):
    """Kombu's Redis transport with :class:`Channel`'s atomic fetch."""

    Channel = Channel
