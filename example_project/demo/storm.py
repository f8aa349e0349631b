"""One duplicate storm against two fresh workers, in a process of its own.

The demo runs this module once per task base, with ``EXAMPLE_TASK_BASE`` (and
``BROKER_URL``, ``REDIS_URL``, ``LEDGER_URL``, ``EXAMPLE_QUEUE``) set as for the
workers it starts, so the producer sends with the very task classes the workers run.
The scenarios run one after the other, each on orders of its own:

* republish: each checkout published twice with the same task ids, as a producer
  does that publishes again when the broker's confirm did not come;
* double submit: each checkout sent twice with fresh ids (a double click on "Pay");
* late retry: each checkout sent, and once it completed sent again, with the same
  ids and with fresh ones (a client retrying after a timeout);
* long run: a settlement that runs three leases long, sent again while it runs;
* killed mid-task: each checkout sent once; tens of ``charge_order`` bodies are
  SIGKILLed in their pool processes, before, inside and after their ledger
  transaction and as they return (see ``killer``), and one worker is killed whole
  and started again;
* worker killed: each checkout sent once; one worker is SIGKILLed mid-storm, main
  process and pool at once, and started again.

A scenario is over when every message it sent has had a delivery of its last task
succeed, which the app's ``task_success`` receiver counts (see ``monitoring``), or
at its deadline; the two with kills are over when every checkout's result arrived,
as its producer would see it. Then the scenario's orders are counted in the ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Task
from kombu.utils.url import maybe_sanitize_url

from example_project import monitoring, settings
from example_project.celery import app
from example_project.demo.killer import Killer
from example_project.demo.progress import Progress
from example_project.demo.workers import WorkerProcess
from example_project.ledger import Ledger
from example_project.tasks import charge_order, checkout, send_receipt, settle_batch

#: Shares of the orders given to the scenarios; the rest go to "worker killed", so
#: that it runs long enough to be killed in the middle.
SHARES = {"republish": 0.2, "double submit": 0.2, "late retry": 0.2, "killed mid-task": 0.2}
#: Messages each scenario sends per order (per batch for "long run").
SENDS = {
    "republish": 2,
    "double submit": 2,
    "late retry": 3,
    "long run": 2,
    "killed mid-task": 1,
    "worker killed": 1,
}
#: Pool processes "killed mid-task" SIGKILLs (at most one per order).
MID_TASK_KILLS = 40
#: The settlement of "long run": three times its 1 s lease.
SETTLE_SECONDS = 3.0
#: Share of "worker killed" to complete before the kill.
KILL_AFTER = 0.3

CHAIN = (charge_order, send_receipt)


@dataclass
class Outcome:
    """What one scenario sent, ran and left in the ledger."""

    scenario: str
    orders: int
    sent: int = 0
    executed: int = 0
    replayed: int = 0
    taken_over: int = 0
    rows: int = 0
    duplicates: int = 0
    lost: int = 0
    seconds: float = 0.0
    complete: bool = True
    #: Pool processes SIGKILLed mid-body, and whole workers (main process and pool).
    killed_processes: int = 0
    killed_workers: int = 0


def amount_for(order_id: int) -> int:
    """The amount of an order, in cents: the same on every run."""
    return 500 + order_id * 7919 % 19500


def split(first_order: int, count: int) -> dict[str, list[int]]:
    """Give each scenario its orders ("long run" gets one batch, numbered like an order)."""
    orders = list(range(first_order, first_order + count))
    plan: dict[str, list[int]] = {}
    start = 0
    for name, share in SHARES.items():
        size = max(1, int(count * share))
        plan[name] = orders[start : start + size]
        start += size
    plan["long run"] = [first_order]
    plan["worker killed"] = orders[start:]
    return plan


class Storm:
    """Sends the scenarios, kills and restarts one worker, and counts the outcome."""

    def __init__(
        self,
        first_order: int,
        count: int,
        workers: Sequence[WorkerProcess],
        ledger: Ledger,
        progress_title: str,
        redis_url: str,
    ) -> None:
        self.plan = split(first_order, count)
        self.workers = workers
        self.ledger = ledger
        total = sum(len(orders) * SENDS[name] for name, orders in self.plan.items())
        self.progress = Progress(progress_title, total)
        self.settled = 0
        self.baseline: Counter[str] = Counter()
        self.killed: dict[str, Any] = {}
        self.redis_url = redis_url

    def run(self) -> list[Outcome]:
        """Run every scenario, in order, and return their outcomes."""
        outcomes = [
            self.measure("republish", self.republish),
            self.measure("double submit", self.double_submit),
            self.measure("late retry", self.late_retry),
            self.measure("long run", self.long_run),
            self.measure("killed mid-task", self.killed_mid_task),
            self.measure("worker killed", self.worker_killed),
        ]
        self.progress.close()
        return outcomes

    def measure(self, name: str, scenario: Callable[[list[int], Outcome], tuple[int, bool]]) -> Outcome:
        """Run one scenario; count its deliveries from the metrics and its rows in the ledger."""
        orders = self.plan[name]
        self.baseline = counters()
        outcome = Outcome(name, len(orders))
        started = time.monotonic()
        outcome.sent, outcome.complete = scenario(orders, outcome)
        outcome.seconds = round(time.monotonic() - started, 1)
        after = counters()
        tasks = (settle_batch,) if name == "long run" else CHAIN
        outcome.executed, outcome.replayed, outcome.taken_over = (
            sum(after[f"{task.name}:{event}"] - self.baseline[f"{task.name}:{event}"] for task in tasks)
            for event in ("executed", "replayed", "taken_over")
        )
        tables = ("settlements",) if name == "long run" else ("charges", "receipts")
        missing: set[int] = set()
        for table in tables:
            tally = self.ledger.tally(table, orders)
            outcome.rows += tally.rows
            outcome.duplicates += tally.duplicates
            missing.update(tally.missing)
        outcome.lost = len(missing)
        self.settled += outcome.sent
        self.progress.note(
            f"{name}: {outcome.sent} sent, {outcome.executed} executed, {outcome.replayed} from cache, "
            f"{outcome.duplicates} duplicate rows, {outcome.lost} lost, {outcome.seconds}s"
            + ("" if outcome.complete else " (deadline passed before every message was handled)")
        )
        return outcome

    def republish(self, orders: list[int], outcome: Outcome) -> tuple[int, bool]:
        for order_id in orders:
            workflow = checkout(order_id, amount_for(order_id))
            workflow.freeze()  # fixes the task ids, so both publishes carry the same ones
            workflow.apply_async()
            workflow.apply_async()
        return 2 * len(orders), self.await_count(send_receipt, "succeeded", 2 * len(orders), "republish")

    def double_submit(self, orders: list[int], outcome: Outcome) -> tuple[int, bool]:
        for order_id in orders:
            checkout(order_id, amount_for(order_id)).delay()
            checkout(order_id, amount_for(order_id)).delay()
        return 2 * len(orders), self.await_count(send_receipt, "succeeded", 2 * len(orders), "double submit")

    def late_retry(self, orders: list[int], outcome: Outcome) -> tuple[int, bool]:
        workflows = []
        for order_id in orders:
            workflow = checkout(order_id, amount_for(order_id))
            workflow.freeze()
            workflow.apply_async()
            workflows.append(workflow)
        first = self.await_count(send_receipt, "succeeded", len(orders), "late retry")
        for order_id, workflow in zip(orders, workflows):
            workflow.apply_async()
            checkout(order_id, amount_for(order_id)).delay()
        return 3 * len(orders), first and self.await_count(
            send_receipt, "succeeded", 3 * len(orders), "late retry"
        )

    def long_run(self, batches: list[int], outcome: Outcome) -> tuple[int, bool]:
        (batch_id,) = batches
        settle_batch.delay(batch_id, SETTLE_SECONDS)
        started = self.await_count(settle_batch, "executed", 1, "long run")
        settle_batch.delay(batch_id, SETTLE_SECONDS)
        return 2, started and self.await_count(settle_batch, "succeeded", 2, "long run")

    def killed_mid_task(self, orders: list[int], outcome: Outcome) -> tuple[int, bool]:
        killer = Killer(self.redis_url, orders, MID_TASK_KILLS, self.workers)
        killer.clear()
        killer.start()
        try:
            pending = self.send_checkouts(orders)
            complete = self.await_checkouts(pending, "killed mid-task", killer)
        finally:
            killer.stop()
        outcome.killed_processes = killer.kills
        outcome.killed_workers = 1 if killer.worker else 0
        self.killed["killed mid-task"] = {
            "processes": dict(killer.killed),
            "victims": killer.victims,
            "worker": killer.worker,
        }
        moments = ", ".join(f"{n} {moment}" for moment, n in killer.killed.items())
        self.progress.note(f"SIGKILLed {killer.kills} pool processes mid-body ({moments})")
        return len(orders), complete

    def worker_killed(self, orders: list[int], outcome: Outcome) -> tuple[int, bool]:
        pending = self.send_checkouts(orders)
        self.await_count(send_receipt, "succeeded", max(1, int(len(orders) * KILL_AFTER)), "worker killed")
        victim = self.workers[0]
        pid = victim.pid
        victim.kill()
        outcome.killed_workers = 1
        self.killed["worker killed"] = {"worker": {"hostname": victim.hostname, "pid": pid}}
        self.restart(victim, pid)
        # Nothing is sent again: the killed worker's messages come back from the
        # broker (RabbitMQ at once; the Redis transport after its visibility
        # timeout, and celery_idem's atomic fetch keeps a message the worker was
        # taking from vanishing), and its leases are taken over.
        return len(orders), self.await_checkouts(pending, "worker killed")

    def send_checkouts(self, orders: list[int]) -> dict[int, Any]:
        """Send each order's checkout once; return each order's final result."""
        pending = {}
        for order_id in orders:
            workflow = checkout(order_id, amount_for(order_id))
            pending[order_id] = workflow.freeze()
            workflow.apply_async()
        return pending

    def await_checkouts(self, pending: dict[int, Any], phase: str, killer: Killer | None = None) -> bool:
        """Wait for each checkout's receipt; False at the deadline.

        A worker the killer kills whole is started again from here.
        """
        total = len(pending)
        deadline = time.monotonic() + 60 + 0.5 * total
        while pending:
            if killer is not None and killer.worker_killed.is_set():
                killer.worker_killed.clear()
                victim = next(w for w in self.workers if w.hostname == killer.worker["hostname"])
                self.restart(victim, killer.worker["pid"])
            pending = {order: result for order, result in pending.items() if not result.successful()}
            self.progress.show(self.settled + total - len(pending), phase)
            if pending and time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def restart(self, victim: WorkerProcess, pid: int | None) -> None:
        self.progress.note(f"SIGKILLed worker {victim.hostname} (pid {pid}) with its pool; starting it again")
        victim.start()
        victim.wait_ready()
        self.progress.note(f"{victim.hostname} is back (pid {victim.pid})")

    def await_count(self, task: Task, event: str, target: int, phase: str) -> bool:
        """Wait until ``task`` counted ``target`` ``event``s in this scenario; False at the deadline.

        The deadline is generous: a killed worker's messages come back after the
        broker's visibility timeout, and its leases are taken over after theirs.
        """
        field = f"{task.name}:{event}"
        deadline = time.monotonic() + 60 + 0.5 * target
        while True:
            done = counters()[field] - self.baseline[field]
            shown = done if event == "succeeded" else 0
            self.progress.show(self.settled + min(shown, target), phase)
            if done >= target:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def counters() -> Counter[str]:
    return Counter(monitoring.read(app))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_project.demo.storm", description=__doc__)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--first-order", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True, help="where to write the outcome, as JSON")
    parser.add_argument("--title", default=settings.TASK_BASE)
    parser.add_argument("--run-id", default="demo", help="makes the worker names unique")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)

    events = redis.Redis.from_url(settings.REDIS_URL)
    ledger = Ledger(settings.LEDGER_URL)
    ledger.create_schema()
    workers = [
        WorkerProcess(
            f"w{n}-{settings.TASK_BASE}-{args.run_id}",
            os.environ,
            args.run_dir / f"worker-{settings.TASK_BASE}-{n}.log",
            events,
        )
        for n in (1, 2)
    ]
    finished = False
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        storm = Storm(args.first_order, args.orders, workers, ledger, args.title, settings.REDIS_URL)
        started = time.monotonic()
        outcomes = storm.run()
        total = Outcome(
            "total", sum(o.orders for o in outcomes), seconds=round(time.monotonic() - started, 1)
        )
        for outcome in outcomes:
            for field in (
                "sent",
                "executed",
                "replayed",
                "taken_over",
                "rows",
                "duplicates",
                "lost",
                "killed_processes",
                "killed_workers",
            ):
                setattr(total, field, getattr(total, field) + getattr(outcome, field))
            total.complete = total.complete and outcome.complete
        result = {
            "task_base": settings.TASK_BASE,
            "broker": maybe_sanitize_url(settings.BROKER_URL),
            "ledger": maybe_sanitize_url(settings.LEDGER_URL),
            "scenarios": [asdict(o) for o in outcomes],
            "total": asdict(total),
            "killed": storm.killed,
            "logs": [str(worker.logfile) for worker in workers],
        }
        args.result.write_text(json.dumps(result, indent=2))
        finished = True
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        # Clean up without being interrupted again halfway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not finished:
            for worker in workers:
                worker.kill()
        else:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.stop()
        ledger.close()


if __name__ == "__main__":
    sys.exit(main())
