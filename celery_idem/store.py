"""The Redis record of each idempotency key: acquire, renew, commit, release, steps, submit, read.

Every verb is one ``EVALSHA`` of a script in ``lua/`` (renewal of many leases is one
pipelined round trip per node), and the scripts alone decide state and count what they
decided: Python passes arguments and turns the reply into :class:`Acquired`,
:class:`Finished`, :class:`Busy` or :class:`Mismatch`. Every mutation is
owner-checked by fencing token, so a run that lost its lease can neither renew,
commit nor release someone else's.

Every script is safe to run twice (a call sent again after its reply was lost
changes and counts nothing more), and a call is sent at most twice: redis-py's own
retries, which would send a script that ran but timed out up to ten more times, are
not used for scripts.

The store works on one server, a Sentinel primary or a Redis Cluster: each script
touches the keys of one shard (one hash tag, see :mod:`celery_idem.keys`), and on a
cluster it is sent to the node that owns that slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, TypeVar, Union

import redis
import redis.cluster
from redis.exceptions import NoScriptError

from .errors import LeaseLost
from .keys import STATES, record_pattern, shard_stats_keys, stats_key, steps_key

__all__ = [
    "BACKEND_ERRORS",
    "COUNTERS",
    "STATES",
    "Acquired",
    "Busy",
    "Finished",
    "Mismatch",
    "Outcome",
    "Record",
    "RecordDetails",
    "RecordStore",
    "Send",
    "Sent",
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

#: Every counter the scripts keep, per task name, and what it counts.
COUNTERS: Mapping[str, str] = {
    "executed": "acquisitions that ran the body (takeovers included)",
    "succeeded": "results recorded",
    "failures_recorded": "failures recorded (cached errors, results that could not be recorded)",
    "replayed": "deliveries that returned a recorded outcome without running",
    "conflicts_retry": "deliveries that found the key held and re-queued themselves",
    "conflicts_wait": "deliveries that found the key held and waited (wait policy, eager mode)",
    "conflicts_raise": "deliveries that found the key held and failed (raise policy)",
    "conflicts_drop": "deliveries that found the key held and were dropped (drop policy)",
    "takeovers": "acquisitions of a key whose holder stopped renewing its lease",
    "leases_lost": "runs that found their lease taken over (renewal, step, commit or release refused)",
    "released": "runs that freed their key without an outcome (the body raised)",
    "freed_after_crash": "keys freed by a worker's main process after the run's process died",
    "backend_errors": "calls that could not reach Redis, counted when the delivery next got through",
    "steps_run": "steps that ran and stored their value",
    "steps_replayed": "steps returned from their stored value",
    "transactions_run": "transactions of finished runs that ran",
    "transactions_replayed": "transactions returned from their stored row",
    "deduplicated_on_submit": "calls not sent because a record of their key existed",
    "freed_by_operator": "keys freed by hand (celery idem release)",
}


_T = TypeVar("_T")


def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


class _Script:
    """A Lua script from the package, run by SHA and loaded only when Redis lacks it.

    ``uses`` names the package's Lua files of shared functions the script calls; their
    text comes first in the script Redis loads.
    """

    def __init__(self, name: str, uses: Sequence[str] = ()) -> None:
        self.name = name
        self.source = "".join(_lua(part) + "\n" for part in uses) + _lua(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


_ACQUIRE = _Script("acquire", uses=("payload",))
_RENEW = _Script("renew")
_COMMIT = _Script("commit")
_RELEASE = _Script("release")
_STEP = _Script("step")
_SUBMIT = _Script("submit", uses=("payload",))
_PURGE = _Script("purge")
_INSPECT = _Script("inspect")


@dataclass(frozen=True)
class Acquired:
    """The caller now holds the lease under ``token``."""

    token: int
    #: True when the lease of a run that stopped renewing was taken over.
    taken_over: bool
    #: A value higher than every earlier run of the key had, across records too.
    fence: int = 0
    #: True when no run of the key came before: no step can be stored yet.
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


@dataclass(frozen=True)
class Mismatch:
    """The record of the key was made by a call with other arguments (their digests)."""

    payload: str


AcquireResult = Union[Acquired, Finished, Busy, Mismatch]


@dataclass(frozen=True)
class Send:
    """Submit: no record of the key exists; a marker now names this call, send it."""


@dataclass(frozen=True)
class Sent:
    """Submit: a record of the key exists, for the task id ``holder``: do not send."""

    holder: str


SubmitResult = Union[Send, Sent, Mismatch]


@dataclass(frozen=True)
class Record:
    """What a record holds, for inspection."""

    state: str
    token: int
    holder: str | None
    outcome: Outcome | None
    fence: int = 0
    #: Milliseconds of server time the lease ends at, for a running record.
    expires: int | None = None
    #: The task's name, as the delivery that made the record gave it.
    task: str | None = None
    #: The worker (node name) the holder runs, or ran, on.
    host: str | None = None


@dataclass(frozen=True)
class RecordDetails:
    """A record with what an operator asks next: how long it lives, its lease, its steps."""

    key: str
    record: Record
    #: Milliseconds until Redis deletes the record (None: it does not expire).
    ttl_ms: int | None
    #: Milliseconds until the lease ends, by the server's clock (running records only;
    #: zero or less when it ended and nothing renewed it).
    lease_left_ms: int | None
    #: Names of the steps stored beside the record.
    steps: tuple[str, ...] = ()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pack(parts: Sequence[Any]) -> bytes:
    """A command in RESP, packed in one pass: redis-py's packer costs more than the round trip's
    own Python for commands of a dozen arguments (str, int and bytes only)."""
    chunks = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        chunks.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(chunks)


def _record(fields: Mapping[str, Any], outcome: Outcome | None) -> Record:
    holder, expires = fields.get("holder"), fields.get("expires")
    task, host = fields.get("task"), fields.get("host")
    return Record(
        state=_text(fields["state"]),
        token=int(fields.get("token", 0)),
        holder=_text(holder) if holder is not None else None,
        outcome=outcome,
        fence=int(fields.get("fence", 0)),
        expires=int(expires) if expires is not None else None,
        task=(_text(task) or None) if task is not None else None,
        host=(_text(host) or None) if host is not None else None,
    )


def _counts(values: Sequence[int], size: int) -> list[int]:
    return [*values, *([0] * (size - len(values)))][:size]


class RecordStore:
    """The records kept in one Redis database (a server, a Sentinel primary or a cluster)."""

    def __init__(self, client: Any, url: str) -> None:
        self.client = client
        #: The URL with any password removed, for messages.
        self.url = url
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        #: Connections not in use, per node, kept out of redis-py's pool (see :meth:`_run`).
        self._idle: dict[str, list[Any]] = {}
        self._pid = os.getpid()

    # -- the verbs -------------------------------------------------------------------

    def acquire(
        self,
        key: str,
        holder: str,
        lease_ms: int,
        keep_ms: int,
        run: str = "",
        task: str = "",
        policy: str = "retry",
        payload: str = "",
        errors: int = 0,
        host: str = "",
    ) -> AcquireResult:
        """Take the lease on ``key`` for task ``holder``, or report who has it or what it returned.

        ``run`` identifies this delivery's run (for :meth:`release_run`, and so that
        this very call sent again is known as such); ``task`` names the counters,
        ``policy`` the conflict policy counted if the key is held; ``payload`` is
        checked against the record's (``idempotency_validate_payload``); ``errors``
        counts the backend errors the delivery met before; ``host`` names the worker
        the holder runs on, kept in the record for operators.
        """
        reply = self._run(
            _ACQUIRE, self._keys(key), holder, lease_ms, keep_ms, run, task, policy, payload, errors, host
        )
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
        if kind == 3:
            return Mismatch(_text(reply[1]))
        return Busy(holder=_text(reply[1]), lease_left=int(reply[2]) / 1000, token=int(reply[3]))

    def renew(self, leases: Sequence[tuple[Any, ...]]) -> list[bool]:
        """Renew many leases in one round trip (one per node on a cluster).

        ``leases`` holds ``(key, token, lease_ms, keep_ms[, task])`` tuples; the
        answer says, for each, whether the caller still held it.

        The store pipelines the scripts itself, per node, on its own connections:
        redis-py's cluster pipeline refuses ``evalsha`` and, given ``EVALSHA``
        through ``execute_command``, asks a node ``COMMAND GETKEYS`` for every one
        of them to find its slot, a round trip per lease. Here the slot of each key
        is computed locally, and every node gets all its leases in one write. A node
        that lacks the script gets it loaded and the missing renewals sent again; a
        lease whose slot moved (a failover) is sent to its new owner once the slot
        map was read again.
        """
        if not leases:
            return []
        renewed: list[bool] = [False] * len(leases)
        pending = list(range(len(leases)))
        for attempt in range(2):
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for i in pending:
                node, pool = self._node(leases[i][0])
                by_node.setdefault(node, (pool, []))[1].append(i)
            moved = []
            for node, (pool, indices) in by_node.items():
                commands = [self._renew_command(leases[i]) for i in indices]
                for i, reply in zip(indices, self._pipeline(node, pool, _RENEW, commands)):
                    if isinstance(reply, (redis.exceptions.MovedError, redis.exceptions.AskError)):
                        moved.append(i)
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        renewed[i] = bool(reply)
            if not moved:
                return renewed
            if attempt == 0:
                self.client.nodes_manager.initialize()
            pending = moved
        for i in pending:  # nodes that still disagree: redis-py's client follows the redirects
            key, token, lease_ms, keep_ms, *named = leases[i]
            task = named[0] if named else ""
            renewed[i] = bool(
                self._cluster_command(_RENEW, self._keys(key), (token, lease_ms, keep_ms, task))
            )
        return renewed

    def _renew_command(self, lease: tuple[Any, ...]) -> bytes:
        key, token, lease_ms, keep_ms, *named = lease
        task = named[0] if named else ""
        return _pack(("EVALSHA", _RENEW.sha, 3, *self._keys(key), token, lease_ms, keep_ms, task))

    def commit(
        self,
        key: str,
        token: int,
        failed: bool,
        outcome: Outcome,
        keep_ms: int,
        task: str = "",
        counts: Sequence[int] = (),
        min_replicas: int = 0,
        replicas_timeout_ms: int = 1000,
    ) -> int | None:
        """Record the outcome of the run holding ``token``.

        ``counts`` are the run's steps replayed, transactions run, transactions
        replayed and earlier commit attempts that met a backend error, counted with
        the outcome. Raises :class:`~celery_idem.errors.LeaseLost` when another run
        holds or finished the key: the record is left as that run made it.

        With ``min_replicas`` (``idempotency_min_replicas``), ``WAIT min_replicas
        replicas_timeout_ms`` follows the script on the same connection, in the same
        write, and the answer is how many replicas acknowledged the commit within the
        timeout (it may be fewer: the commit stands on the primary either way);
        without, None.
        """
        state = "failed" if failed else "done"
        wait = (min_replicas, replicas_timeout_ms) if min_replicas > 0 else None
        reply, acknowledged = self._run_waiting(
            _COMMIT,
            self._keys(key),
            (
                token,
                state,
                outcome.data,
                outcome.content_type,
                outcome.content_encoding,
                keep_ms,
                task,
                *_counts(counts, 4),
            ),
            wait,
        )
        if reply[0] != 1:
            raise LeaseLost(key, token, _text(reply[1]), int(reply[2]))
        return acknowledged

    def store_step(self, key: str, token: int, name: str, value: bytes, task: str = "") -> None:
        """Store the value of step ``name`` of the run holding ``token``.

        Raises :class:`~celery_idem.errors.LeaseLost` when another run holds or
        finished the key: nothing is stored.
        """
        reply = self._run(_STEP, self._keys(key), token, name, value, task)
        if reply != 1:
            raise LeaseLost(key, token, _text(reply[1]), int(reply[2]))

    def release(self, key: str, token: int, keep_ms: int, task: str = "", counts: Sequence[int] = ()) -> bool:
        """Free the lease held under ``token`` without an outcome; False if not held.

        ``counts``: the run's steps replayed, transactions run and transactions replayed.
        """
        return bool(
            self._run(_RELEASE, self._keys(key), "token", token, keep_ms, "", task, *_counts(counts, 3))
        )

    def release_holder(self, key: str, holder: str, keep_ms: int, task: str = "") -> bool:
        """Free the lease if task ``holder`` holds it; False if it does not."""
        return bool(self._run(_RELEASE, self._keys(key), "holder", holder, keep_ms, "", task, 0, 0, 0))

    def release_run(self, key: str, holder: str, run: str, keep_ms: int, task: str = "") -> bool:
        """Free the lease if run ``run`` of task ``holder`` holds it; False if it does not.

        For the worker's main process, which saw the run die: a later run of the same
        task id (the redelivery of its message) has another run id and keeps its lease.
        """
        return bool(self._run(_RELEASE, self._keys(key), "run", holder, keep_ms, run, task, 0, 0, 0))

    def release_by_operator(
        self, key: str, token: int, keep_ms: int, task: str = "", live: bool = False
    ) -> int:
        """Free a running key by hand, if it is still held under ``token`` (the token the operator saw).

        Returns 1 when freed (or already free under ``token``), 0 when another run
        acquired the key since or it is not running, and 2 when its lease is still
        being renewed and ``live`` is False. A run whose live lease is freed cannot
        record its outcome afterwards (its commit raises ``LeaseLost``).
        """
        return int(
            self._run(
                _RELEASE, self._keys(key), "operator", token, keep_ms, "1" if live else "", task, 0, 0, 0
            )
        )

    def withdraw(self, key: str, task_id: str, keep_ms: int) -> bool:
        """Remove the ``queued`` marker of ``task_id`` (its message could not be sent)."""
        return bool(self._run(_RELEASE, self._keys(key), "marker", task_id, keep_ms, "", "", 0, 0, 0))

    def submit(self, key: str, task_id: str, payload: str, ttl_ms: int, task: str = "") -> SubmitResult:
        """Decide whether a call about to be sent under ``task_id`` should be (submit-side dedup).

        :class:`Send` (a ``queued`` marker naming ``task_id`` now stands for the key,
        for ``ttl_ms``), :class:`Sent` (a record of the key exists, for the task id it
        names), or :class:`Mismatch` (the record is for other arguments).
        """
        reply = self._run(_SUBMIT, [key, stats_key(key)], task_id, payload, ttl_ms, task)
        if reply[0] == 0:
            return Send()
        if reply[0] == 1:
            return Sent(_text(reply[1]))
        return Mismatch(_text(reply[1]))

    def read(self, key: str) -> Record | None:
        """Return what the record of ``key`` holds, or None if there is none."""
        raw: dict[bytes, bytes] = self.client.hgetall(key)
        fields = {_text(k): v for k, v in raw.items()}
        if "state" not in fields:
            return None
        outcome = None
        if "result" in fields:
            outcome = Outcome(fields["result"], _text(fields["ctype"]), _text(fields["cenc"]))
        return _record(fields, outcome)

    def details(self, key: str) -> RecordDetails | None:
        """Return the record of ``key`` with its TTL, lease left and step names (one script, ``inspect.lua``)."""
        flat, ttl, steps, now = self._run(_INSPECT, [key, steps_key(key)])
        fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        if "state" not in fields:
            return None
        outcome = None
        if "result" in fields:
            outcome = Outcome(fields["result"], _text(fields["ctype"]), _text(fields["cenc"]))
        record = _record(fields, outcome)
        return RecordDetails(
            key=key,
            record=record,
            ttl_ms=int(ttl) if int(ttl) >= 0 else None,
            lease_left_ms=record.expires - int(now) if record.state == "running" and record.expires else None,
            steps=tuple(sorted(_text(name) for name in steps)),
        )

    def scan(self, prefix: str, batch: int = 1000) -> Iterator[tuple[int, list[tuple[str, Record]]]]:
        """Every record under ``prefix``, by SCAN (never KEYS), in batches.

        Yields ``(keys scanned, records)`` per batch: the records are read with one
        pipelined ``HMGET`` per batch (without their outcomes), and the count of keys
        scanned lets a caller show progress. On a cluster every primary is scanned.
        A record may change or vanish while the scan runs; one that exists for the
        whole scan is seen once or, rarely, twice (SCAN's own guarantee).
        """
        names = ("state", "token", "holder", "fence", "expires", "task", "host")
        pending: list[str] = []

        def read(keys: list[str]) -> list[tuple[str, Record]]:
            pipe = self.client.pipeline(transaction=False)
            for name in keys:
                pipe.hmget(name, names)
            found = []
            for name, values in zip(keys, pipe.execute()):
                fields = {field: value for field, value in zip(names, values) if value is not None}
                if "state" in fields:
                    found.append((name, _record(fields, None)))
            return found

        for name in self.client.scan_iter(match=record_pattern(prefix), count=batch):
            pending.append(_text(name))
            if len(pending) >= batch:
                yield len(pending), read(pending)
                pending = []
        if pending:
            yield len(pending), read(pending)

    def purge(self, keys: Sequence[str], states: Sequence[str], task: str = "") -> int:
        """Delete the records ``keys`` and their steps, each only if still in ``states`` (and of ``task``).

        One pipelined round trip (one per node on a cluster); returns how many were deleted.
        """
        if not keys:
            return 0
        wanted = "," + ",".join(states) + ","
        deleted = 0
        pending = list(keys)
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            for name in pending:
                pipe.execute_command("EVALSHA", _PURGE.sha, 2, name, steps_key(name), wanted, task)
            missing = []
            for name, reply in zip(pending, pipe.execute(raise_on_error=False)):
                if isinstance(reply, NoScriptError):
                    missing.append(name)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    deleted += int(reply)
            if not missing:
                break
            self.client.script_load(_PURGE.source)  # on a cluster: on every primary
            pending = missing
        return deleted

    def stats(self, prefix: str) -> dict[str, dict[str, int]]:
        """Every counter of the records under ``prefix``, summed over the shards, per task name."""
        pipe = self.client.pipeline(transaction=False)
        for key in shard_stats_keys(prefix):
            pipe.hgetall(key)
        totals: dict[str, dict[str, int]] = {}
        for shard in pipe.execute():
            for name, value in shard.items():
                task, _, counter = _text(name).rpartition("\x1f")
                per_task = totals.setdefault(task, {})
                per_task[counter] = per_task.get(counter, 0) + int(value)
        return totals

    # -- sending scripts -------------------------------------------------------------

    @staticmethod
    def _keys(key: str) -> list[str]:
        return [key, steps_key(key), stats_key(key)]

    def _node(self, key: str) -> tuple[str, Any]:
        """The name of the node serving ``key`` and a way to make connections to it."""
        if not self._cluster:
            return "", self.client.connection_pool
        node = self.client.get_node_from_key(key)
        return node.name, self.client.get_redis_connection(node).connection_pool

    def _run(self, script: _Script, keys: Sequence[str], *args: Any) -> Any:
        """Run ``script`` on a connection of this store, loading it if Redis lacks it.

        The store keeps its idle connections itself rather than take one from
        redis-py's pool and give it back for every script: that round of the pool,
        and redis-py's per-command bookkeeping, cost about a quarter of each call's
        time. A call cut off by anything but an error reply closes its connection,
        so a reply is never read by the wrong call. A call that fails with a
        connection error or a timeout is sent once more, on a new connection (a
        connection the server closed while it sat idle fails on its first use); it
        may have run, which every script allows. redis-py's retry policy is not
        used. On a cluster, a script sent to a node that no longer owns the slot
        (after a failover or a resharding) makes the store read the slot map again
        and send it to the new owner.
        """
        return self._run_waiting(script, keys, args, None)[0]

    def _run_waiting(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any], wait: tuple[int, int] | None
    ) -> tuple[Any, int | None]:
        """:meth:`_run`, followed by ``WAIT replicas timeout_ms`` on the same connection if ``wait``.

        Returns the script's reply and the number of replicas ``WAIT`` counted (None
        without ``wait``). The one path that cannot wait is a cluster whose nodes
        disagree on a slot's owner (a slot being migrated, or a failover not yet known
        to every node): redis-py's cluster client runs the script, following the
        redirects, and the answer is 0 replicas.
        """
        if self._pid != os.getpid():  # a forked child: the parent's sockets are not ours
            self._idle, self._pid = {}, os.getpid()
        try:
            return self._send(script, keys, args, wait)
        except redis.exceptions.MovedError:
            if not self._cluster:
                raise
            # The slot moved (a failover, a resharding): read the slot map again and
            # send the script to the slot's new owner, as a cluster client would.
            self.client.nodes_manager.initialize()
            try:
                return self._send(script, keys, args, wait)
            except (redis.exceptions.MovedError, redis.exceptions.AskError):
                pass  # the nodes do not agree yet: redis-py's client retries and follows
        except redis.exceptions.AskError:
            if not self._cluster:
                raise
        return self._cluster_command(script, keys, args), (0 if wait else None)

    def _send(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any], wait: tuple[int, int] | None
    ) -> tuple[Any, int | None]:
        node, pool = self._node(keys[0])
        command = _pack(("EVALSHA", script.sha, len(keys), *keys, *args))
        if wait is not None:
            # WAIT counts the replicas that have this connection's writes so far: it
            # must follow the script on the same connection, and may share its write.
            command += _pack(("WAIT", *wait))

        def exchange(connection: Any) -> tuple[Any, int | None]:
            connection.send_packed_command([command], False)
            try:
                reply: Any = connection.read_response()
            except redis.exceptions.ResponseError as exc:
                reply = exc  # the WAIT's reply follows it and must be read too
            replicas = int(connection.read_response()) if wait is not None else None
            if isinstance(reply, Exception):
                raise reply
            return reply, replicas

        def call(connection: Any) -> tuple[Any, int | None]:
            try:
                return exchange(connection)
            except NoScriptError:
                # A server restarted without its scripts, or a replica promoted in a
                # failover (Redis does not replicate SCRIPT LOAD): load and send again.
                connection.send_command("SCRIPT", "LOAD", script.source)
                connection.read_response()
                return exchange(connection)

        return self._on_connection(node, pool, call)

    def _pipeline(self, node: str, pool: Any, script: _Script, commands: list[bytes]) -> list[Any]:
        """Send ``commands`` (EVALSHA of ``script``) in one write; their replies, errors as values."""

        def exchange(connection: Any, batch: list[bytes]) -> list[Any]:
            connection.send_packed_command([b"".join(batch)], False)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(connection.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
            return replies

        def call(connection: Any) -> list[Any]:
            replies = exchange(connection, commands)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                connection.send_command("SCRIPT", "LOAD", script.source)
                connection.read_response()
                for i, reply in zip(missing, exchange(connection, [commands[i] for i in missing])):
                    replies[i] = reply
            return replies

        return self._on_connection(node, pool, call)

    def _on_connection(self, node: str, pool: Any, call: Callable[[Any], _T]) -> _T:
        """``call(connection)`` on an idle connection of ``node``, once more on a new one if it was cut."""
        idle = self._idle.setdefault(node, [])
        # Every idle connection is connected: a connection is connected by connect()
        # before its first use and again after a disconnect, never lazily by the send.
        # redis-py 8's send_packed_command connects a Sentinel-managed connection
        # without asking the sentinels, to the default localhost:6379.
        connection = idle.pop() if idle else None
        fresh = connection is None
        if connection is None:
            connection = pool.make_connection()
        try:
            try:
                if fresh:
                    connection.connect()
                result = call(connection)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                connection.disconnect()
                connection.connect()
                result = call(connection)
        except redis.exceptions.ResponseError:
            idle.append(connection)  # an error reply, read whole: the connection is in step
            raise
        except BaseException:
            # Whatever cut the call off (also an exception raised by a signal handler,
            # a soft time limit, between sending and reading), its reply must not be
            # left for the next call to read.
            connection.disconnect()
            raise
        idle.append(connection)
        return result

    def _cluster_command(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.client.script_load(script.source)
            return self.client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


_stores: dict[tuple[str, str], RecordStore] = {}
_stores_lock = threading.Lock()


#: The store of each (url, options object) seen, so that a delivery finds its store
#: without serialising its options (the options of a task's config are one object).
_by_identity: dict[tuple[str, int], tuple[Mapping[str, Any], RecordStore]] = {}


def store_for(url: str, options: Mapping[str, Any]) -> RecordStore:
    """Return this process's store for ``url``; one client (and pool) per URL and options.

    Any URL :mod:`celery_idem.connections` accepts: a server, a Sentinel primary or a
    Redis Cluster. Raises :class:`~celery_idem.errors.ImproperlyConfigured` for a URL
    or options it refuses.
    """
    seen = _by_identity.get((url, id(options)))
    if seen is not None and seen[0] is options:
        return seen[1]
    cache_key = (url, json.dumps(dict(options), sort_keys=True, default=repr))
    store = _stores.get(cache_key)
    if store is None:
        from .connections import client_for, redact

        with _stores_lock:
            store = _stores.get(cache_key)
            if store is None:
                store = _stores[cache_key] = RecordStore(client_for(url, options), redact(url))
    _by_identity[(url, id(options))] = (options, store)
    return store


def reset_stores() -> None:
    """Forget every client: a forked child must not share its parent's sockets."""
    with _stores_lock:
        _stores.clear()
        _by_identity.clear()
