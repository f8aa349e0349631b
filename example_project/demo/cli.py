"""``python -m example_project.demo``: a duplicate storm, and what it left in the ledger.

Starts a private Redis (unless ``REDIS_URL`` is set) for the idempotency records,
the results and, unless ``--broker`` names another, the broker; then runs a storm
(see :mod:`example_project.demo.storm`) against two fresh workers, with plain
``celery.Task`` first when ``--compare`` is given, and prints what was sent, run,
served from cache and written. The ledgers are SQLite files in the run directory,
or ``LEDGER_URL`` when it is set. Exits 1 if the idempotent run left a duplicate
row or lost an order, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from celery_idem.testing import RedisServer
from example_project.demo.report import LEGEND, TITLES, compare_table, single_table
from example_project.demo.workers import ROOT
from example_project.ledger import Ledger

#: Orders of storm n are numbered from n * ORDER_BLOCK + 1.
ORDER_BLOCK = 1_000_000
#: Counts the storms run against one Redis.
STORMS_KEY = "example:demo:storms"


class StormFailed(Exception):
    """A storm process ended without an outcome."""


class Demo:
    """The processes of one demo run, and what they found."""

    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.run_id = uuid.uuid4().hex[:8]
        self.ledger_url = os.environ.get("LEDGER_URL")
        self.server: RedisServer | None = None
        self.redis_url = ""
        self.broker = ""
        self.storm: subprocess.Popen[bytes] | None = None
        self.queues: list[str] = []

    def run(self) -> int:
        """Run the storms, print the tables, and return the exit code."""
        self.redis_url = os.environ.get("REDIS_URL") or ""
        if not self.redis_url:
            self.server = RedisServer(appendonly=True)
            self.server.start()
            self.redis_url = self.server.url
        self.broker = self.args.broker or self.redis_url
        private = " (private, appendonly)" if self.server else ""
        print(f"records and results: {maybe_sanitize_url(self.redis_url)}{private}")
        print(f"broker: {maybe_sanitize_url(self.broker)}")
        ledger = maybe_sanitize_url(self.ledger_url) if self.ledger_url else "SQLite, in the run directory"
        print(f"ledger: {ledger}")
        print(f"run directory: {self.run_dir}\n")

        task_bases = ("plain", "idempotent") if self.args.compare else ("idempotent",)
        results = {task_base: self.run_storm(task_base) for task_base in task_bases}
        return self.report(results)

    def run_storm(self, task_base: str) -> dict[str, Any]:
        """Run one storm in a process of its own, with this task base, and return its outcome."""
        # A queue of this storm's alone: messages left over by another run (or by the
        # plain storm) never reach this storm's workers.
        queue = f"celery-idem-demo-{self.run_id}-{task_base}"
        self.queues.append(queue)
        ledger_url = self.ledger_url or f"sqlite:///{self.run_dir / f'ledger-{task_base}.sqlite3'}"
        result_file = self.run_dir / f"storm-{task_base}.json"
        env = {
            **os.environ,
            "BROKER_URL": self.broker,
            "REDIS_URL": self.redis_url,
            "LEDGER_URL": ledger_url,
            "EXAMPLE_TASK_BASE": task_base,
            "EXAMPLE_QUEUE": queue,
            # charge_order bodies report where they are, for the killer of "killed mid-task".
            "EXAMPLE_TRACE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable,
            "-m",
            "example_project.demo.storm",
            f"--orders={self.args.orders}",
            f"--first-order={self.first_order_of_next_storm(ledger_url)}",
            f"--run-dir={self.run_dir}",
            f"--result={result_file}",
            f"--title={task_base}",
            f"--run-id={self.run_id}",
        ]
        self.storm = subprocess.Popen(command, env=env, cwd=ROOT)
        code = self.storm.wait()
        self.storm = None
        if code == 130:
            raise KeyboardInterrupt
        if code != 0:
            raise StormFailed(f"the {task_base} storm failed (exit code {code}); logs are in {self.run_dir}")
        result: dict[str, Any] = json.loads(result_file.read_text())
        return result

    def first_order_of_next_storm(self, ledger_url: str) -> int:
        """Number the next storm's orders in a block of their own.

        Past the storms counted in Redis and past the ledger's orders, so a run against
        a Redis or a ledger that outlives it never meets an earlier run's records or rows.
        """
        ledger = Ledger(ledger_url)
        try:
            ledger.create_schema()
            highest = ledger.highest_order_id()
        finally:
            ledger.close()
        storms = redis.Redis.from_url(self.redis_url)
        try:
            block = max(int(storms.incr(STORMS_KEY)), highest // ORDER_BLOCK + 1)
            storms.set(STORMS_KEY, block)
        finally:
            storms.close()
        return block * ORDER_BLOCK + 1

    def report(self, results: dict[str, dict[str, Any]]) -> int:
        """Print the tables and where everything is; 1 if the idempotent run failed."""
        idempotent = results["idempotent"]
        print()
        if "plain" in results:
            print(compare_table(results["plain"], idempotent))
        else:
            print(f"{TITLES['idempotent']}:")
            print(single_table(idempotent))
        print(f"\n{LEGEND}")
        if not all(result["total"]["complete"] for result in results.values()):
            print("* the deadline passed before every message of the scenario was handled")
        for task_base, result in results.items():
            print(f"\n{task_base} run:")
            for scenario, killed in result["killed"].items():
                processes = killed.get("processes")
                if processes:
                    moments = ", ".join(f"{n} {moment}" for moment, n in processes.items())
                    print(f"  {scenario}: SIGKILLed {sum(processes.values())} pool processes ({moments})")
                worker = killed.get("worker")
                if worker:
                    print(f"  {scenario}: SIGKILLed {worker['hostname']} (pid {worker['pid']}), restarted it")
        print(f"\nworker logs and outcomes (JSON) in {self.run_dir}:")
        for path in sorted(self.run_dir.iterdir()):
            print(f"  {path.name}")
        if self.ledger_url:
            print(f"ledger: {maybe_sanitize_url(self.ledger_url)}")

        total = idempotent["total"]
        if total["duplicates"] or total["lost"] or not total["complete"]:
            print(
                f"\nFAILED: the idempotent run left {total['duplicates']} duplicate rows "
                f"and {total['lost']} lost orders",
                file=sys.stderr,
            )
            return 1
        print(f"\nOK: {total['sent']} messages, 0 duplicate rows, 0 lost orders.")
        return 0

    def close(self) -> None:
        """Stop the storm process (it stops its workers), delete the queues, stop Redis."""
        if self.storm is not None:
            if self.storm.poll() is None:
                self.storm.send_signal(signal.SIGTERM)
            try:
                self.storm.wait(60)
            except subprocess.TimeoutExpired:
                self.storm.kill()
                self.storm.wait()
        # A private Redis takes its queues with it; any other broker keeps them.
        if self.queues and (self.server is None or self.broker != self.server.url):
            delete_queues(self.broker, self.queues)
        if self.server is not None:
            self.server.close()


def delete_queues(broker: str, queues: Sequence[str]) -> None:
    """Delete the run's queues, and any message still in them."""
    try:
        with Connection(broker, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
            channel = connection.default_channel
            for queue in queues:
                channel.queue_delete(queue)
    except Exception as exc:  # cleaning up must not hide the outcome
        print(f"could not delete the queues {', '.join(queues)}: {exc}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.demo",
        description="Send a storm of duplicate Celery messages to two workers, SIGKILL tens of "
        "tasks mid-run and whole workers, and count what the tasks wrote to the ledger.",
    )
    parser.add_argument("--orders", type=int, default=500, help="orders in the storm (default 500)")
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL, e.g. amqp://guest:guest@127.0.0.1:5672// (default: the Redis of the records)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="run the same storm on plain celery.Task first, to compare"
    )
    parser.add_argument(
        "--run-dir", type=Path, help="where logs and ledgers go (default: a new temporary directory)"
    )
    args = parser.parse_args(argv)
    if not 5 <= args.orders < ORDER_BLOCK:
        parser.error(f"--orders must be between 5 and {ORDER_BLOCK - 1}")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="celery-idem-demo-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo(args, run_dir)
    try:
        return demo.run()
    except StormFailed as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the workers and Redis", file=sys.stderr)
        return 130
    finally:
        # Clean up without being interrupted again halfway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.close()
