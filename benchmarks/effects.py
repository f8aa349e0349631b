"""The cost of making an effect once: a task doing one ledger insert into PostgreSQL.

Variants, each a solo worker draining N pre-queued tasks on the private Redis broker:

* plain ``celery.Task`` inserting the row directly (autocommit), and in a
  transaction of its own (``BEGIN``, ``INSERT``, ``COMMIT``);
* ``IdempotentTask`` inserting it directly, outside any transaction of ours;
* ``IdempotentTask`` inserting it in ``self.idempotency.transaction``, which adds
  the step row to the same transaction;
* ``IdempotentTask`` with a ``self.idempotency.step`` (no database), for the cost of
  a step that runs: its value stored in Redis.

PostgreSQL is the one at ``IDEM_BENCH_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``), in a schema of the benchmark's own,
dropped at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .harness import Options, Servers, median
from .report import Table, runs_text
from .throughput import Drain, drain

NAME = "effects"
TITLE = "Effects: one ledger insert per task, plain, outside and inside a fenced transaction"

POSTGRES_URL = os.environ.get("IDEM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

VARIANTS = {
    "bench.effects.plain": "plain `celery.Task`, insert (autocommit)",
    "bench.effects.plain_tx": "plain `celery.Task`, insert in a transaction of its own",
    "bench.effects.outside": "`IdempotentTask`, insert outside `transaction`",
    "bench.effects.transaction": "`IdempotentTask`, insert in `self.idempotency.transaction`",
    "bench.effects.step": "`IdempotentTask`, one `self.idempotency.step` (Redis, no insert)",
}


def reachable() -> str | None:
    """None if PostgreSQL accepts a connection, else why not."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            return None
    except Exception as exc:  # any failure to connect means: skip, and say why
        return f"{type(exc).__name__}: {exc}"


@contextmanager
def schema() -> Iterator[str]:
    """A schema of the benchmark's own, with the ledger; yields its URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
        admin.execute(f"CREATE TABLE {name}.ledger (id bigserial PRIMARY KEY, n bigint)")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {name} CASCADE")


def run(options: Options, servers: Servers) -> list[Table]:
    count = options.pick(3000, 500, options.tasks)
    runs = options.pick(5, 3, options.runs)
    print(f"{TITLE}: {len(VARIANTS)} variants x {runs} runs x {count:,} tasks")
    results: dict[str, list[Drain]] = {task: [] for task in VARIANTS}
    with schema() as url:
        settings = {"idempotency_database_url": url}
        for task in VARIANTS:  # warm-up: connections, scripts, the step table
            drain(servers, task, 100, extra_settings=settings)
        for round_ in range(runs):
            for task in VARIANTS:
                result = drain(servers, task, count, extra_settings=settings)
                results[task].append(result)
                print(f"  run {round_ + 1}/{runs} {task}: {result.rate():,.0f} tasks/s")
    table = Table(
        f"One ledger insert per task ({count:,} tasks, solo worker, Redis broker)",
        [
            "task",
            "median tasks/s",
            "range",
            "ratio to plain",
            "SQL statements / task",
            "records-server commands / task",
        ],
    )
    plain = median(d.rate() for d in results["bench.effects.plain"])
    for task, label in VARIANTS.items():
        drains = results[task]
        rates = [d.rate() for d in drains]
        sql = median(sum(d.report.get("statements", {}).values()) / d.tasks for d in drains)
        table.add(
            label,
            f"{median(rates):,.0f}",
            f"{min(rates):,.0f} to {max(rates):,.0f}",
            f"{median(rates) / plain:.2f}",
            f"{sql:.2f}",
            f"{median(d.per_task(d.records_commands) for d in drains):.2f}",
        )
    table.notes.append(
        f"{runs_text(runs)} of {count:,} tasks per variant, alternating, after a warm-up run each"
    )
    table.notes.append(
        "SQL statements / task: counted in the worker; the transaction's BEGIN and COMMIT count as two "
        "(the plain and outside variants run one INSERT in autocommit)"
    )
    table.notes.append(
        "records-server commands / task: `INFO commandstats` deltas, Lua scripts' own commands included"
    )
    return [table]
