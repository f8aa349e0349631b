"""Real worker processes for tests, and waiting on what their tasks report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery.result import ResultSet

ROOT = Path(__file__).resolve().parent.parent


def worker_command(hostname: str, *options: str, app: str = "tests.worker_app") -> list[str]:
    """The command line of a test worker running ``app`` (``tests.worker_app`` by default)."""
    return [
        sys.executable,
        *("-m", "celery", "-A", app, "worker", "-n", hostname, "-l", "INFO"),
        *("--without-heartbeat", "--without-gossip", "--without-mingle"),
        *options,
    ]


class Worker:
    """A ``celery worker`` process running ``tests.worker_app`` in its own session.

    Started in a new session so that :meth:`kill` takes the pool children down with
    the main process, as a machine failure would. ``app`` runs another app module
    (the Django project's, say) and ``env`` adds to its environment.
    """

    def __init__(
        self,
        name: str,
        conf: dict[str, Any],
        events: redis.Redis,
        concurrency: int = 1,
        pool: str = "prefork",
        queues: str | None = None,
        app: str = "tests.worker_app",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.app = app
        self.env = env or {}
        self.conf = conf
        self.events = events
        self.concurrency = concurrency
        self.pool = pool
        self.queues = queues
        self.process: subprocess.Popen[bytes] | None = None
        self.logfile = Path(tempfile.mkstemp(prefix=f"celery-idem-{name}-", suffix=".log")[1])

    @property
    def hostname(self) -> str:
        return f"{self.name}@test"

    def start(self, timeout: float = 60) -> Worker:
        env = {**os.environ, **self.env, "IDEM_TEST_CONF": json.dumps(self.conf), "PYTHONPATH": str(ROOT)}
        args = worker_command(self.hostname, "-P", self.pool, "-c", str(self.concurrency), app=self.app)
        if self.queues:
            args += ["-Q", self.queues]
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if self.events.blpop([f"ready:{self.hostname}"], timeout=timeout) is None:
            self.kill()
            raise RuntimeError(f"worker {self.name} did not start:\n{self.log()[-4000:]}")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()  # reaps the group and forgets the process
                return
        self._reap_group()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children."""
        if self.process is None:
            return
        self._reap_group()
        self.process.wait(30)
        self.process = None

    def _reap_group(self) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of the worker (SIGSTOP / SIGCONT)."""
        assert self.process is not None
        os.killpg(self.process.pid, signum)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


def outcome(result: Any, timeout: float) -> Any:
    """``result.get(timeout=timeout)``, without a second of waiting when it already finished.

    Before celery 5.7, ``AsyncResult.get()`` on the Redis result backend reads the
    backend's pub/sub connection once before it looks whether the result it waits
    for is ready. A result whose message was read while the caller waited on another
    one then costs a whole read timeout (one second) although it is known: a test
    collecting a few hundred results spends minutes on that alone. Reading the state
    first (one GET) keeps a finished result, which ``get()`` then returns at once;
    an unfinished one is waited for as usual.

    A group's results are joined one at a time: before celery 5.7, the native join
    of a group whose tasks all finished before it was called waits for messages
    that were sent before it listened, until its timeout.
    """
    result.ready()
    if isinstance(result, ResultSet):
        return result.join(timeout=timeout)
    return result.get(timeout=timeout)


def next_report(events: redis.Redis, kind: str, label: str, timeout: float = 60) -> dict[str, Any]:
    """Block until a body reports ``kind`` (started / finished) for ``label``."""
    item = events.blpop([f"{kind}:{label}"], timeout=timeout)
    if item is None:
        raise AssertionError(f"no {kind} report for {label!r} within {timeout}s")
    return json.loads(item[1])


def runs(events: redis.Redis, label: str) -> int:
    """How many times the body ran for ``label``."""
    return int(events.get(f"runs:{label}") or 0)


def await_change(client: redis.Redis, key: str, read: Any, predicate: Any, timeout: float = 30) -> Any:
    """Block until ``predicate(read(key))`` holds; return what ``read`` returned.

    Woken by Redis keyspace notifications on the test's private server, so the wait
    ends on the change itself, not on a polling interval.
    """
    client.config_set("notify-keyspace-events", "K$hg")
    db = client.connection_pool.connection_kwargs.get("db", 0)
    pubsub = client.pubsub()
    pubsub.subscribe(f"__keyspace@{db}__:{key}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            value = read(key)
            if predicate(value):
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{key} never matched; last seen {value!r}")
            pubsub.get_message(timeout=min(left, 1.0))
    finally:
        pubsub.close()


def await_record(client: redis.Redis, key: str, predicate: Any, timeout: float = 30) -> dict[str, str]:
    """Block until the hash at ``key`` (a record, say) satisfies ``predicate``; return it."""

    def read(name: str) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in client.hgetall(name).items() if _s(k) != "result"}

    return await_change(client, key, read, predicate, timeout)


def record_key_of(name: str = "k") -> str:
    """A record key for store-level tests."""
    from celery_idem.keys import record_key

    return record_key("idem", "tests.task", name)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def acquired(claim: Any, token: int, taken_over: bool) -> bool:
    """True when ``claim`` is an acquisition under ``token`` (and a takeover if ``taken_over``)."""
    from celery_idem.store import Acquired

    return isinstance(claim, Acquired) and (claim.token, claim.taken_over) == (token, taken_over)


class Proxy:
    """A TCP forwarder on loopback that a test can cut, as a network failure would.

    While cut, connections through it are closed and new ones are refused; the
    server behind it keeps running (a shared PostgreSQL, say, that tests must not stop).
    """

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        from celery_idem.testing import free_port

        self.target = (host, port)
        self.port = free_port()
        self._socket = socket
        self._threading = threading
        self._lock = threading.Lock()
        self._pairs: list[tuple[Any, Any]] = []
        self._muted: set[Any] = set()
        #: How many chunks of replies :meth:`lose_replies` made the proxy drop.
        self.dropped = 0
        self._listener: Any = None
        self.restore()

    def restore(self) -> None:
        """Accept connections again."""
        listener = self._socket.socket()
        listener.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def lose_replies(self) -> None:
        """From now on, drop what the server sends on the connections open now (lost replies).

        The requests still reach the server, which runs them; their callers time out.
        Connections opened later are forwarded as usual.
        """
        with self._lock:
            self._muted.update(upstream for _, upstream in self._pairs)

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # Closing alone leaves a thread blocked in accept() holding the socket
            # open, and the next connection gets through: shutdown wakes it.
            try:
                listener.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: Any, sink: Any) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if source in self._muted:
                    self.dropped += 1
                    continue  # a reply lost on its way
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop the proxy."""
        self.cut()


class Boom(Exception):
    """A crash made by a body: raised after an effect, before the Redis commit."""


def attempts(task: Any, *args: Any, task_id: str = "t1", **kwargs: Any) -> Any:
    """Deliver the same message until the body gets through; return its result."""
    for _ in range(5):
        try:
            return task.apply(args, kwargs, task_id=task_id).get(disable_sync_subtasks=False)
        except Boom:
            continue
    raise AssertionError("the body never got through")


def lease_ended(client: Any, key: str) -> None:
    """Return once the lease on ``key`` has run out by the Redis server's clock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seconds, micros = client.time()
        if int(client.hget(key, "expires") or 0) < seconds * 1000 + micros // 1000:
            return
    raise AssertionError(f"the lease on {key} never ran out")
