"""Private Redis servers and worker processes for the benchmarks, and their cleanup.

Every process started here is registered until it is stopped, and stopped at
interpreter exit if the benchmark failed first; workers run in their own session so
that stopping one takes its pool children with it. The shared Redis on port 6379 is
never touched: each role gets a private ``redis-server`` on a free port.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from celery_idem.testing import RedisServer

from .app import CONF_VARIABLE

__all__ = ["ROOT", "Options", "Servers", "Worker", "command_delta", "command_stats", "median"]

ROOT = Path(__file__).resolve().parent.parent

_live_workers: set[Worker] = set()
_live_servers: set[RedisServer] = set()


def _cleanup() -> None:
    for worker in list(_live_workers):
        worker.kill()
    for server in list(_live_servers):
        server.close()
        _live_servers.discard(server)


atexit.register(_cleanup)


class Servers:
    """One private redis-server per role.

    * ``broker``: the Celery broker (db 0) and, when asked, the result backend (db 1);
    * ``records``: celery_idem's records (and the peers' locks), nothing else, so its
      ``INFO commandstats`` counts only what deduplication costs;
    * ``control``: worker reports, outside both.
    """

    ROLES = ("broker", "records", "control")

    def __init__(self) -> None:
        self._servers: dict[str, RedisServer] = {}
        self._clients: dict[str, redis.Redis] = {}

    def __enter__(self) -> Servers:
        try:
            for role in self.ROLES:
                server = RedisServer()
                _live_servers.add(server)
                self._servers[role] = server
                server.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for server in self._servers.values():
            server.close()
            _live_servers.discard(server)
        self._servers.clear()

    def url(self, role: str, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self._servers[role].port}/{db}"

    def client(self, role: str) -> redis.Redis:
        """An admin client of ``role``'s server (db 0), for flushing and ``INFO``."""
        if role not in self._clients:
            self._clients[role] = redis.Redis.from_url(self.url(role))
        return self._clients[role]

    def flush(self, *roles: str) -> None:
        for role in roles:
            self.client(role).flushall()

    def redis_version(self) -> str:
        return str(self.client("control").info("server")["redis_version"])


def command_stats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started, from ``INFO commandstats``."""
    return {name.split("_", 1)[1]: int(value["calls"]) for name, value in client.info("commandstats").items()}


def command_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Commands run between two :func:`command_stats` readings, without the readings' own ``INFO``."""
    delta = {name: after[name] - before.get(name, 0) for name in after if name != "info"}
    return {name: count for name, count in delta.items() if count}


class Worker:
    """A ``celery worker`` process running :mod:`benchmarks.app`.

    ``bench`` is the worker's ``bench`` configuration (see :mod:`benchmarks.app`)
    without ``control_url`` and ``report_key``, which are filled in here.
    """

    _names = 0

    def __init__(
        self,
        servers: Servers,
        settings: Mapping[str, Any],
        bench: Mapping[str, Any],
        pool: str = "solo",
        concurrency: int = 1,
    ) -> None:
        Worker._names += 1
        self.name = f"bench{os.getpid()}-{Worker._names}"
        self.report_key = f"report:{self.name}"
        self.control = servers.client("control")
        self.conf = {
            "celery": dict(settings),
            "bench": {**bench, "control_url": servers.url("control"), "report_key": self.report_key},
        }
        self.pool = pool
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None
        fd, path = tempfile.mkstemp(prefix=f"celery-idem-{self.name}-", suffix=".log")
        os.close(fd)
        self.logfile = Path(path)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc_type is None:
            self.logfile.unlink(missing_ok=True)
        else:
            print(f"(worker log kept at {self.logfile})", file=sys.stderr)

    def start(self, timeout: float = 120) -> Worker:
        env = {**os.environ, CONF_VARIABLE: json.dumps(self.conf), "PYTHONPATH": str(ROOT)}
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.app",
            "worker",
            "-n",
            f"{self.name}@localhost",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-l",
            "WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ]
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(
                args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _live_workers.add(self)
        try:
            self._wait(f"ready:{self.report_key}", timeout, "start")
        except BaseException:
            self.kill()
            raise
        return self

    def report(self, timeout: float) -> dict[str, Any]:
        """The next report the worker pushed, waiting up to ``timeout`` seconds."""
        report: dict[str, Any] = json.loads(self._wait(self.report_key, timeout, "report"))
        return report

    def reports(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self.report(max(1.0, deadline - time.monotonic())) for _ in range(count)]

    def _wait(self, key: str, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            item = self.control.blpop([key], timeout=1)
            if item is not None:
                value = item[1]
                return value if isinstance(value, bytes) else value.encode()
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.name} exited with {self.process.returncode} before its {what}:\n"
                    + self.log_tail()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker {self.name}: no {what} within {timeout:.0f}s:\n" + self.log_tail()
                )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM to the whole session), then SIGKILL if it hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL whatever is left of the worker's session."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait(30)
        self.process = None
        _live_workers.discard(self)

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median of nothing")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


class Options:
    """What the command line asked of every benchmark."""

    def __init__(self, quick: bool = False, tasks: int | None = None, runs: int | None = None) -> None:
        self.quick = quick
        self.tasks = tasks
        self.runs = runs

    def pick(self, full: int, quick: int, given: int | None) -> int:
        """``given`` if the command line set it, else the quick or the full default."""
        if given is not None:
            return given
        return quick if self.quick else full
