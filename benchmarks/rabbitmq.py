"""The throughput workload on RabbitMQ: plain Celery, celery_idem and, if installed, the peers.

The Redis-broker benchmarks include celery_idem's broker transport, which makes
every task of a worker faster; on RabbitMQ there is no such transport, so this
table shows what the task itself costs against plain Celery: its two ``EVALSHA``
round trips to the records server, and their Python. Messages go to the RabbitMQ
at ``IDEM_BENCH_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``), into
a queue of the benchmark's own (``celery-idem-benchmarks``, purged before every run
and deleted at the end); records and the peers' locks live on the private records
server as in the other benchmarks.
"""

from __future__ import annotations

import os

from kombu import Connection

from .harness import Options, Servers
from .peers import missing
from .peers.throughput import ONCE, SINGLETON
from .report import Table
from .throughput import IDEM_ARGS, IDEM_ID, PLAIN, SHARED_BROKER_QUEUE, Variant, compare, ratio_table

#: The workers of plain Celery and of the peers stall for up to 10 s at a time on
#: RabbitMQ (kombu's event loop; docs/design.md, "The event-loop stall"), which
#: celery_idem's workers do not. These variants run them in a worker that imports
#: celery_idem, so that the comparison is of the tasks' own cost.
PLAIN_FIXED = Variant(
    "plain `celery.Task` (acks_late), worker with celery_idem's loop fix", "bench.plain", loop_fix=True
)
ONCE_FIXED = Variant(
    "celery-once `QueueOnce`, worker with celery_idem's loop fix", "bench.once", loop_fix=True
)
SINGLETON_FIXED = Variant(
    "celery-singleton `Singleton`, worker with celery_idem's loop fix", "bench.singleton", loop_fix=True
)

NAME = "rabbitmq"
TITLE = "Throughput on RabbitMQ: plain Celery, celery_idem and the peers"

#: The RabbitMQ the benchmark uses.
AMQP_URL = os.environ.get("IDEM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def reachable(url: str) -> str | None:
    """None if RabbitMQ at ``url`` accepts a connection, else why not."""
    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # any failure to connect means: skip, and say why
        return f"{type(exc).__name__}: {exc}"
    return None


def _notes(table: Table, end_to_end: bool) -> None:
    table.notes.append(
        f"broker: RabbitMQ at {Connection(AMQP_URL).as_uri()}, queue `{SHARED_BROKER_QUEUE}` purged before every run"
    )
    table.notes.append(
        "ratios are to the first row, plain Celery in a worker with celery_idem's event-loop fix; "
        "rows without the fix are stock workers, whose runs include kombu's stalls of up to 10 s"
    )
    if missing():
        table.notes.append("celery-once and celery-singleton were not installed for this run")
    elif end_to_end:
        table.notes.append(
            "celery-once and celery-singleton take their lock when the task is sent: "
            "here that is in the time and in the records-server counts"
        )
    else:
        table.notes.append(
            "celery-once and celery-singleton take their lock when the task is sent; "
            "the records-server commands they run at send time are not counted here"
        )


#: The runs: (pool, processes, end to end).
MODES = (("solo", 1, False), ("solo", 1, True), ("prefork", 2, False), ("prefork", 2, True))


def run(options: Options, servers: Servers) -> list[Table]:
    fixed = [PLAIN_FIXED, IDEM_ID, IDEM_ARGS]
    stock = [PLAIN]
    if not missing():
        fixed += [ONCE_FIXED, SINGLETON_FIXED]
        stock += [ONCE, SINGLETON]
    count = options.pick(5000, 1000, options.tasks)
    runs = options.pick(5, 3, options.runs)
    tables = []
    try:
        for pool, processes, end_to_end in MODES:
            # Stock workers only in the first table of a full run: they show the stall
            # (up to 10 s a run), which the rest leave out.
            variants = fixed + stock if not tables and not options.quick else fixed
            what = "published while the worker runs" if end_to_end else "pre-queued"
            worker = "solo worker" if pool == "solo" else f"prefork worker, {processes} processes"
            print(f"{TITLE}: {len(variants)} variants x {runs} runs x {count:,} tasks, {worker}, {what}")
            results = compare(
                servers,
                variants,
                count,
                runs,
                warmup=not options.quick and not tables,
                broker_url=AMQP_URL,
                end_to_end=end_to_end,
                pool=pool,
                concurrency=processes,
            )
            how = "end to end: publish and drain" if end_to_end else "drain of pre-queued tasks"
            table = ratio_table(
                f"Throughput on RabbitMQ, {how}, ignore_result=True ({count:,} tasks, {worker})",
                results,
                count,
                runs,
                span="end_to_end" if end_to_end else "body_span",
                broker_counted=False,
            )
            _notes(table, end_to_end)
            tables.append(table)
    finally:
        with Connection(AMQP_URL) as connection:
            connection.default_channel.queue_delete(SHARED_BROKER_QUEUE)
    return tables
