"""Serving duplicates: a queue made only of re-sent, already finished tasks.

Each run drains N first executions of ``IdempotentTask`` (key = task id), then the
same N task ids sent again after they finished, each in a fresh solo worker; a
plain-task run of the same size is the reference. A duplicate runs no body, so
rates here are over deliveries (first ``task_prerun`` to last ``task_postrun`` in
the worker), for all three.
"""

from __future__ import annotations

from kombu.utils.uuid import uuid

from .harness import Options, Servers, median
from .report import Table, runs_text
from .throughput import IDEM_ID, PLAIN, drain

NAME = "duplicates"
TITLE = "Duplicate serving"


def run(options: Options, servers: Servers) -> list[Table]:
    count = options.pick(5000, 1000, options.tasks)
    runs = options.pick(5, 3, options.runs)
    print(f"{TITLE}: {runs} runs x (plain, first executions, duplicates) x {count:,} tasks")
    rates: dict[str, list[float]] = {"plain": [], "first": [], "duplicate": []}
    records: dict[str, list[float]] = {"plain": [], "first": [], "duplicate": []}
    for run_number in range(runs):
        plain = drain(servers, PLAIN.task, count)
        ids = [uuid() for _ in range(count)]
        first = drain(servers, IDEM_ID.task, count, task_ids=ids)
        again = drain(servers, IDEM_ID.task, count, task_ids=ids, keep_records=True)
        if first.report["bodies"] != count or again.report["bodies"] != 0:
            raise RuntimeError(
                f"bodies run: {first.report['bodies']} first executions, {again.report['bodies']} "
                f"duplicates; expected {count} and 0"
            )
        for phase, result in (("plain", plain), ("first", first), ("duplicate", again)):
            rates[phase].append(result.rate("delivery_span"))
            records[phase].append(result.per_task(result.records_commands))
        print(
            f"  run {run_number + 1}/{runs}: plain {rates['plain'][-1]:,.0f}, first {rates['first'][-1]:,.0f}, "
            f"duplicates {rates['duplicate'][-1]:,.0f} tasks/s"
        )
    table = Table(
        f"Duplicates of finished tasks vs first executions ({count:,} tasks, solo worker)",
        [
            "queue",
            "median tasks/s",
            "range",
            "ratio to first executions",
            "ratio to plain",
            "records-server commands / task",
        ],
    )
    labels = {
        "plain": "plain `celery.Task` (reference)",
        "first": "`IdempotentTask`, first executions",
        "duplicate": "`IdempotentTask`, duplicates of finished tasks",
    }
    first_median, plain_median = median(rates["first"]), median(rates["plain"])
    for phase, label in labels.items():
        table.add(
            label,
            f"{median(rates[phase]):,.0f}",
            f"{min(rates[phase]):,.0f} to {max(rates[phase]):,.0f}",
            f"{median(rates[phase]) / first_median:.2f}",
            f"{median(rates[phase]) / plain_median:.2f}",
            f"{median(records[phase]):.2f}",
        )
    table.notes.append(
        f"{runs_text(runs)}, each: plain, first executions, duplicates (same task ids re-sent after they finished); "
        "rate over deliveries, first task_prerun to last task_postrun in the worker"
    )
    return [table]
