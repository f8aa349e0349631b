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

Kombu restores an unacknowledged message only once it is older than
``visibility_timeout`` (an hour by default), so the messages of a worker killed as a
whole wait that long. Here a worker keeps a heartbeat key per consumer, renewed by a
thread of its own (so a ``-P solo`` worker busy with a long task keeps beating), the
fetch script records which consumer took each message, and every worker's event
loop restores, within seconds, the messages of consumers whose heartbeat stopped
for ``dead_consumer_timeout`` seconds (a transport option, default 6). Messages of
live consumers are left alone, however long their tasks run.

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
import os
import threading
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from queue import Empty
from time import monotonic, time
from typing import Any

import kombu
from celery.utils.log import get_logger
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

__all__ = [
    "TESTED_KOMBU",
    "Channel",
    "QoS",
    "Transport",
    "beat",
    "beat_and_reap",
    "fallback_reason",
    "heartbeats",
]

logger = get_logger(__name__)

_FETCH_SOURCE = resources.files(__package__).joinpath("lua", "fetch.lua").read_text()
_FETCH_SHA = hashlib.sha1(_FETCH_SOURCE.encode()).hexdigest()

#: What the channel sends on its consumer connection: our fetch, our wait, or kombu's BRPOP.
_FETCH, _WAIT, _KOMBU = "fetch", "wait", "kombu"

#: Hash of delivery tag -> id of the consumer that fetched the message.
OWNERS_KEY = "celery_idem.unacked_owners"
#: Prefix of each consumer's heartbeat key.
HEARTBEAT_PREFIX = "celery_idem.consumer."
#: Default seconds without a heartbeat after which a consumer counts as dead.
DEAD_CONSUMER_TIMEOUT = 6.0

#: What kombu counts as "the broker cannot be reached".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = kombu_redis.get_redis_error_classes()[0]

#: Kombu internals this transport builds on; checked before it is used.
_NEEDED = ("_brpop_start", "_brpop_read", "_get", "_q_for_pri", "priority_steps", "unacked_key")


#: The kombu minor versions this transport is tested with, first and last, both
#: included: 5.7 by ``make test``, 5.3 by ``make test-oldest``, and the latest
#: 5.4, 5.5 and 5.6 releases (5.4.2, 5.5.4, 5.6.2) passed ``tests/test_broker.py``.
TESTED_KOMBU = ((5, 3), (5, 7))


def fallback_reason(version: str = kombu.__version__, channel: type = kombu_redis.Channel) -> str | None:
    """Why workers should keep kombu's own fetch with this kombu, or None if this transport fits it.

    The transport extends private methods of kombu's Redis channel, which change
    between minor versions: it is used only with a kombu minor version it was
    tested with, and whose channel has every method it builds on. Anything else
    keeps kombu's own fetch, with a warning saying why, rather than risk a changed
    behaviour.
    """
    try:
        minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"kombu {version} is not a release version this transport was tested with"
    first, last = TESTED_KOMBU
    if not first <= minor <= last:
        return (
            f"kombu {version} is outside the versions celery_idem's broker transport was tested with "
            f"({first[0]}.{first[1]} to {last[0]}.{last[1]})"
        )
    missing = [name for name in _NEEDED if not hasattr(channel, name)]
    if missing:
        return f"kombu {version}'s Redis channel has no {', '.join(missing)}"
    return None


class QoS(kombu_redis.QoS):
    """Kombu's Redis QoS, for messages the fetch script already recorded.

    Kombu records each message it hands out as unacknowledged with a round trip of
    its own; for a message taken by ``fetch.lua`` that entry exists already, so only
    the in-memory bookkeeping is done. Forgetting a message (acknowledged, rejected,
    restored) also forgets which consumer fetched it.
    """

    def append(self, message: Any, delivery_tag: str) -> None:
        """Track a delivered message; one the fetch script recorded as unacked already is
        not written to Redis again."""
        recorded = self.channel._recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        return pipe.hdel(OWNERS_KEY, delivery_tag)


class Channel(kombu_redis.Channel):
    """Kombu's Redis channel, fetching each message atomically with its registration."""

    QoS = QoS

    #: The command outstanding on the consumer connection, and the one to send next.
    _sent: str = _FETCH
    _next: str = _FETCH
    _atomic: bool | None = None
    #: Set once this consumer's heartbeat key was written: fetches then record it.
    beating = False
    #: The client :meth:`conn_or_acquire` hands out (kombu's own __init__ may ask).
    _shared_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: This consumer's id, recorded with every message it fetches while beating.
        self.consumer_id = uuid.uuid4().hex
        #: Queues consumed without acknowledgements (Celery's reply queues): their
        #: messages must not be recorded as unacknowledged, so kombu fetches them.
        self._no_ack_queues: set[str] = set()
        self._get_no_ack = False
        #: Delivery tags the fetch script recorded as unacknowledged, until the QoS
        #: takes them over.
        self._recorded: set[str] = set()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """A client for one command or pipeline: the caller's, or one kept for reuse.

        Kombu builds a new redis-py client object for each (they share the
        connection pool), twice per message; building one costs more than the
        round trip it is for.
        """
        if client:
            yield client
            return
        if self._shared_client is None:
            self._shared_client = self._create_client()
        yield self._shared_client

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Kombu's, noting queues consumed without acknowledgement (they keep kombu's fetch)."""
        if kwargs.get("no_ack", args[0] if args else False):
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        """Kombu's single-message get, fetching atomically unless ``no_ack``."""
        self._get_no_ack = no_ack
        try:
            return super().basic_get(queue, no_ack=no_ack, **kwargs)
        finally:
            self._get_no_ack = False

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._fetches_atomically() or self._no_ack_queues.intersection(self.active_queues):
            self._sent = _KOMBU
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = getattr(self, "brpop_timeout", 1)  # an attribute since kombu 5.6
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
            connection.send_command("EVALSHA", _FETCH_SHA, len(lists) + 3, *self._fetch_args(lists))

    def _brpop_read(self, **options: Any) -> bool:
        if self._sent == _KOMBU:
            return bool(super()._brpop_read(**options))
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
            self.connection._deliver(self._took(item), dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: Any = None) -> Any:
        if not self._fetches_atomically() or self._get_no_ack:
            return super()._get(queue)
        lists = self._lists([queue])
        with self.conn_or_acquire() as client:
            try:
                reply = client.evalsha(_FETCH_SHA, len(lists) + 3, *self._fetch_args(lists))
            except NoScriptError:
                client.script_load(_FETCH_SOURCE)
                reply = client.evalsha(_FETCH_SHA, len(lists) + 3, *self._fetch_args(lists))
        if not reply:
            raise Empty()
        return self._took(reply[1])

    def _took(self, item: bytes) -> Any:
        message = loads(bytes_to_str(item))
        tag = message.get("properties", {}).get("delivery_tag") if isinstance(message, dict) else None
        if isinstance(tag, str):
            self._recorded.add(tag)
        return message

    def _lists(self, queues: list[str]) -> list[str]:
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _fetch_args(self, lists: list[str]) -> list[Any]:
        timeout = getattr(self.connection, "dead_consumer_timeout", None)
        if timeout is not None and not self.beating:
            # In a worker's event loop: beat once now, so that this very fetch can
            # name its consumer; the loop's timer keeps beating from here on.
            with self.conn_or_acquire() as client:
                client.set(HEARTBEAT_PREFIX + self.consumer_id, 1, px=int(timeout * 1000))
            self.beating = True
            heartbeats().add(self, timeout)
        owner = self.consumer_id if self.beating else ""
        return [*lists, self.unacked_key, self.unacked_index_key, OWNERS_KEY, time(), owner]

    def close(self) -> None:
        """Close the channel; its consumer stops beating (its key then runs out)."""
        heartbeats().discard(self)
        super().close()

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
    """Kombu's Redis transport with :class:`Channel`'s atomic fetch.

    In a worker's event loop it also beats for its consumers and restores the
    messages of dead ones (see the module's documentation).
    """

    Channel = Channel

    #: Set when the transport joins an event loop, which then keeps heartbeats.
    dead_consumer_timeout: float | None = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Kombu's, plus a timer that beats for this worker's consumers and restores the
        messages of consumers whose heartbeat is ``dead_consumer_timeout`` old."""
        super().register_with_event_loop(connection, loop)
        cycle: Any = self.cycle
        old = getattr(cycle, "_celery_idem_tref", None)
        if old is not None:
            old.cancel()
        timeout = float(
            connection.client.transport_options.get("dead_consumer_timeout", DEAD_CONSUMER_TIMEOUT)
        )
        self.dead_consumer_timeout = timeout
        cycle._celery_idem_tref = loop.call_repeatedly(
            max(timeout / 6, 0.1), lambda: beat_and_reap(cycle._channels, timeout)
        )


def beat(channels: list[Any], timeout: float) -> None:
    """Renew the heartbeat keys of ``channels``, in one pipelined round trip."""
    if not channels:
        return
    with channels[0].conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for channel in channels:
            pipe.set(HEARTBEAT_PREFIX + channel.consumer_id, 1, px=int(timeout * 1000))
        pipe.execute()
    for channel in channels:
        channel.beating = True


def beat_and_reap(channels: Any, timeout: float) -> None:
    """Renew the heartbeats of ``channels`` and restore the messages of dead consumers.

    One pipelined round trip renews every heartbeat; one reads the owners hash;
    one checks the heartbeats of the other consumers in it. A message whose consumer
    has no heartbeat is restored with kombu's own (transactional) restore.
    """
    consuming = [
        channel for channel in list(channels) if channel.active_queues and channel._fetches_atomically()
    ]
    if not consuming:
        return
    first = consuming[0]
    try:
        beat(consuming, timeout)
        for channel in consuming:
            # A channel can start beating here, before its first fetch: from now on
            # the thread keeps its heartbeat, whatever the loop is doing.
            heartbeats().add(channel, timeout)
        with first.conn_or_acquire() as client:
            owners = {
                bytes_to_str(tag): bytes_to_str(owner) for tag, owner in client.hgetall(OWNERS_KEY).items()
            }
            others = sorted(set(owners.values()) - {channel.consumer_id for channel in consuming})
            if not others:
                return
            pipe = client.pipeline(transaction=False)
            for owner in others:
                pipe.exists(HEARTBEAT_PREFIX + owner)
            dead = {owner for owner, alive in zip(others, pipe.execute()) if not alive}
            for tag, owner in owners.items():
                if owner in dead:
                    first.qos.restore_by_tag(tag, client)
            if dead:
                logger.warning(
                    "celery-idem: restored the messages of %d consumer(s) that stopped beating",
                    len(dead),
                )
    except _CONNECTION_ERRORS:
        logger.debug("celery-idem: heartbeat skipped, the broker is unreachable", exc_info=True)


class Heartbeats:
    """Renews the heartbeat keys of this process's consumers from a daemon thread.

    The event loop beats too, but a ``-P solo`` worker runs its tasks in the loop:
    a task longer than ``dead_consumer_timeout`` would stop its heartbeat and let
    other workers restore the very message it is running. This thread beats every
    sixth of the shortest timeout whatever the loop is doing; it beats only for
    channels that started beating in an event loop, until they are closed (also
    once they no longer consume).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._channels: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, channel: Any, timeout: float) -> None:
        """Beat for ``channel`` (its key lives ``timeout`` seconds) until it closes."""
        with self._lock:
            if self._channels.get(channel) == timeout:
                return  # already kept: the thread's schedule stands
            self._channels[channel] = timeout
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="celery-idem-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()

    def discard(self, channel: Any) -> None:
        """Stop beating for ``channel``."""
        with self._lock:
            self._channels.pop(channel, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                held = dict(self._channels)
            if not held:
                self._wake.wait()
                self._wake.clear()
                continue
            for timeout in sorted(set(held.values())):
                try:
                    beat([channel for channel, t in held.items() if t == timeout], timeout)
                except Exception:  # the thread must outlive any one failed beat
                    logger.debug("celery-idem: heartbeat failed", exc_info=True)
            self._wake.wait(max(min(held.values()) / 6, 0.05))
            self._wake.clear()


_heartbeats = Heartbeats()


def heartbeats() -> Heartbeats:
    """Return this process's heartbeat thread keeper (a new one after a fork)."""
    global _heartbeats
    if _heartbeats._pid != os.getpid():
        _heartbeats = Heartbeats()
    return _heartbeats
