"""The Redis record of each idempotency key: acquire, renew, commit, release, read.

Every verb is one ``EVALSHA`` of a script in ``lua/`` (renewal of many leases is one
pipelined round trip), and the scripts alone decide state: Python passes arguments
and turns the reply into :class:`Acquired`, :class:`Finished` or :class:`Busy`.
Every mutation is owner-checked by fencing token, so a run that lost its lease can
neither renew, commit nor release someone else's.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Union

import redis
from redis.exceptions import NoScriptError

from .errors import LeaseLost
from .keys import steps_key

__all__ = [
    "BACKEND_ERRORS",
    "Acquired",
    "Busy",
    "Finished",
    "Outcome",
    "Record",
    "RecordStore",
    "reset_stores",
    "store_for",
]

#: Errors that mean "Redis cannot be reached or cannot serve now", as opposed to a
#: bug. They drive ``idempotency_on_backend_error``.
BACKEND_ERRORS: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)

#: Client settings used unless ``idempotency_redis_options`` says otherwise: fail
#: fast when Redis is away rather than hang a worker slot.
_CLIENT_DEFAULTS: Mapping[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 10}


class _Script:
    """A Lua script from the package, run by SHA and loaded only when Redis lacks it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


_ACQUIRE = _Script("acquire")
_RENEW = _Script("renew")
_COMMIT = _Script("commit")
_RELEASE = _Script("release")
_STEP = _Script("step")


@dataclass(frozen=True)
class Acquired:
    """The caller now holds the lease under ``token``."""

    token: int
    #: True when the lease of a run that stopped renewing was taken over.
    taken_over: bool
    #: A value higher than every earlier run of the key had, across records too.
    fence: int = 0
    #: True when no record existed: no earlier run of the key stored anything.
    first: bool = True
    #: The steps earlier runs stored (name -> encoded value).
    steps: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """An encoded result or failure, as kept in a record."""

    data: bytes
    content_type: str
    content_encoding: str


@dataclass(frozen=True)
class Finished:
    """A run already finished; ``outcome`` is its result, or its failure when ``failed``."""

    token: int
    failed: bool
    outcome: Outcome


@dataclass(frozen=True)
class Busy:
    """A live run holds the lease."""

    holder: str
    lease_left: float
    token: int


AcquireResult = Union[Acquired, Finished, Busy]


@dataclass(frozen=True)
class Record:
    """What a record holds, for inspection."""

    state: str
    token: int
    holder: str | None
    outcome: Outcome | None
    fence: int = 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RecordStore:
    """The records kept in one Redis database."""

    def __init__(self, client: redis.Redis, url: str) -> None:
        self.client = client
        #: The URL with any password removed, for messages.
        self.url = url
        #: Connections not in use, kept out of redis-py's pool (see :meth:`_run`).
        self._idle: list[Any] = []
        self._pid = os.getpid()

    def acquire(self, key: str, holder: str, lease_ms: int, keep_ms: int, run: str = "") -> AcquireResult:
        """Take the lease on ``key`` for task ``holder``, or report who has it or what it returned.

        ``run`` identifies this delivery's run, for :meth:`release_run`.
        """
        reply = self._run(_ACQUIRE, key, holder, lease_ms, keep_ms, run)
        kind = reply[0]
        if kind == 0:
            flat = reply[5]
            return Acquired(
                token=int(reply[1]),
                taken_over=bool(reply[2]),
                fence=int(reply[3]),
                first=bool(reply[4]),
                steps={_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)},
            )
        if kind == 1:
            return Finished(
                token=int(reply[1]),
                failed=_text(reply[2]) == "failed",
                outcome=Outcome(reply[3], _text(reply[4]), _text(reply[5])),
            )
        return Busy(holder=_text(reply[1]), lease_left=int(reply[2]) / 1000, token=int(reply[3]))

    def renew(self, leases: Sequence[tuple[str, int, int, int]]) -> list[bool]:
        """Renew many leases in one round trip.

        ``leases`` holds ``(key, token, lease_ms, keep_ms)`` tuples; the answer says,
        for each, whether the caller still held it.
        """
        if not leases:
            return []
        pending = list(range(len(leases)))
        renewed: list[Any] = [None] * len(leases)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for i in pending:
                key, token, lease_ms, keep_ms = leases[i]
                pipe.evalsha(_RENEW.sha, 2, key, steps_key(key), token, lease_ms, keep_ms)
            replies = pipe.execute(raise_on_error=False)
            missing = []
            for i, reply in zip(pending, replies):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    renewed[i] = bool(reply)
            if not missing:
                break
            self.client.script_load(_RENEW.source)
            pending = missing
        return [bool(r) for r in renewed]

    def commit(self, key: str, token: int, failed: bool, outcome: Outcome, keep_ms: int) -> None:
        """Record the outcome of the run holding ``token``.

        Raises :class:`~celery_idem.errors.LeaseLost` when another run holds or
        finished the key: the record is left as that run made it.
        """
        state = "failed" if failed else "done"
        reply = self._run(
            _COMMIT, key, token, state, outcome.data, outcome.content_type, outcome.content_encoding, keep_ms
        )
        if reply[0] != 1:
            raise LeaseLost(key, token, _text(reply[1]), int(reply[2]))

    def store_step(self, key: str, token: int, name: str, value: bytes) -> None:
        """Store the value of step ``name`` of the run holding ``token``.

        Raises :class:`~celery_idem.errors.LeaseLost` when another run holds or
        finished the key: nothing is stored.
        """
        reply = self._run(_STEP, key, token, name, value)
        if reply != 1:
            raise LeaseLost(key, token, _text(reply[1]), int(reply[2]))

    def release(self, key: str, token: int, keep_ms: int) -> bool:
        """Free the lease held under ``token`` without an outcome; False if not held."""
        return bool(self._run(_RELEASE, key, "token", token, keep_ms, ""))

    def release_holder(self, key: str, holder: str, keep_ms: int) -> bool:
        """Free the lease if task ``holder`` holds it; False if it does not."""
        return bool(self._run(_RELEASE, key, "holder", holder, keep_ms, ""))

    def release_run(self, key: str, holder: str, run: str, keep_ms: int) -> bool:
        """Free the lease if run ``run`` of task ``holder`` holds it; False if it does not.

        For the worker's main process, which saw the run die: a later run of the same
        task id (the redelivery of its message) has another run id and keeps its lease.
        """
        return bool(self._run(_RELEASE, key, "run", holder, keep_ms, run))

    def read(self, key: str) -> Record | None:
        """Return what the record of ``key`` holds, or None if there is none."""
        raw: dict[bytes, bytes] = self.client.hgetall(key)  # type: ignore[assignment]
        fields = {_text(k): v for k, v in raw.items()}
        if not fields:
            return None
        outcome = None
        if "result" in fields:
            outcome = Outcome(fields["result"], _text(fields["ctype"]), _text(fields["cenc"]))
        holder = fields.get("holder")
        return Record(
            state=_text(fields["state"]),
            token=int(fields.get("token", 0)),
            holder=_text(holder) if holder is not None else None,
            outcome=outcome,
            fence=int(fields.get("fence", 0)),
        )

    def _run(self, script: _Script, key: str, *args: Any) -> Any:
        """Run ``script`` on a connection of this store, loading it if Redis lacks it.

        The store keeps its idle connections itself rather than take one from
        redis-py's pool and give it back for every script: that round of the pool,
        and redis-py's per-command bookkeeping, cost about a quarter of each call's
        time. A call cut off by anything but an error reply closes its
        connection, so a reply is never read by the wrong call. A call that fails
        with a connection error is sent once more, on a new connection: a connection
        the server closed while it sat idle (a restart) fails on its first use, and
        every script is safe to run twice (a repeated acquire finds its own lease
        and reports it busy, a repeated commit is accepted, a repeated release is a
        no-op).
        """
        steps = steps_key(key)
        if self._pid != os.getpid():  # a forked child: the parent's sockets are not ours
            self._idle, self._pid = [], os.getpid()
        try:
            connection = self._idle.pop()
        except IndexError:
            connection = self.client.connection_pool.make_connection()

        def call() -> Any:
            connection.send_command("EVALSHA", script.sha, 2, key, steps, *args)
            try:
                return connection.read_response()
            except NoScriptError:
                connection.send_command("SCRIPT", "LOAD", script.source)
                connection.read_response()
                connection.send_command("EVALSHA", script.sha, 2, key, steps, *args)
                return connection.read_response()

        def attempt() -> Any:
            retry = getattr(connection, "retry", None)  # the client's retry policy, if it has one
            if retry is None:
                return call()
            return retry.call_with_retry(call, lambda error: connection.disconnect())

        try:
            try:
                return attempt()
            except redis.exceptions.ConnectionError:
                connection.disconnect()
                return attempt()
        except redis.exceptions.ResponseError:
            raise  # an error reply, read whole: the connection is in step
        except BaseException:
            # Whatever cut the call off (also an exception raised by a signal handler,
            # a soft time limit, between sending and reading), its reply must not be
            # left for the next call to read.
            connection.disconnect()
            raise
        finally:
            self._idle.append(connection)


_stores: dict[tuple[str, str], RecordStore] = {}
_stores_lock = threading.Lock()


def store_for(url: str, options: Mapping[str, Any]) -> RecordStore:
    """Return this process's store for ``url``; one client (and pool) per URL and options."""
    cache_key = (url, json.dumps(dict(options), sort_keys=True, default=repr))
    store = _stores.get(cache_key)
    if store is None:
        with _stores_lock:
            store = _stores.get(cache_key)
            if store is None:
                client = redis.Redis.from_url(url, **{**_CLIENT_DEFAULTS, **options})
                store = _stores[cache_key] = RecordStore(client, _redact(url))
    return store


def reset_stores() -> None:
    """Forget every client: a forked child must not share its parent's sockets."""
    with _stores_lock:
        _stores.clear()


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"
