"""The demo's worker processes: each in a session of its own, so it can be killed whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from example_project.monitoring import READY_KEY

#: The repository root: workers import ``example_project`` from there.
ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """``celery -A example_project worker`` with a prefork pool, logging to ``logfile``."""

    def __init__(
        self, name: str, env: Mapping[str, str], logfile: Path, events: redis.Redis, concurrency: int = 2
    ) -> None:
        self.hostname = f"{name}@demo"
        self.env = dict(env)
        self.logfile = logfile
        self.events = events
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the worker; :meth:`wait_ready` waits until it consumes."""
        ready_key = READY_KEY.format(hostname=self.hostname)
        self.events.delete(ready_key)
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "example_project",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(self.concurrency),
            "-l",
            "WARNING",
            "-n",
            self.hostname,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ]
        env = {
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")])),
        }
        with open(self.logfile, "ab") as log:
            # A session of its own: Ctrl-C in the terminal reaches the demo, which
            # stops the workers itself, and kill() takes the pool processes down too.
            self.process = subprocess.Popen(
                args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the worker announced that it is ready (see ``monitoring``)."""
        assert self.process is not None
        ready_key = READY_KEY.format(hostname=self.hostname)
        deadline = time.monotonic() + timeout
        while self.events.blpop([ready_key], timeout=1) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.logfile.read_text(errors="replace")[-3000:]
                self.kill()
                raise RuntimeError(f"worker {self.hostname} did not start; the end of its log:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the main process and its pool processes at once, as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self.process = None

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM): finish the running tasks, then exit."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown, and SIGKILL if it takes longer than ``timeout``."""
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
