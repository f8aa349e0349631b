"""Drain throughput of plain Celery, celery_idem, celery-once and celery-singleton.

The workload and the method are those of :mod:`benchmarks.throughput`; the peers'
locks live on the records server, where celery_idem's records live. Both peers
lock when the task is *sent* (``apply_async``), so that cost falls on the producer
and is not part of the drain; in the worker each releases its lock after the task
ran, one ``DEL``.
"""

from __future__ import annotations

from ..harness import Options, Servers
from ..report import Table
from ..throughput import IDEM_ARGS, IDEM_ID, PLAIN, Variant, compare, ratio_table

NAME = "peers"
TITLE = "Peers: celery-once and celery-singleton on the same workload"

ONCE = Variant("celery-once `QueueOnce`", "bench.once")
SINGLETON = Variant("celery-singleton `Singleton`", "bench.singleton")
VARIANTS = (PLAIN, IDEM_ID, IDEM_ARGS, ONCE, SINGLETON)


def run(options: Options, servers: Servers) -> list[Table]:
    count = options.pick(5000, 1000, options.tasks)
    runs = options.pick(5, 3, options.runs)
    print(f"{TITLE}: {len(VARIANTS)} variants x {runs} runs x {count:,} tasks, ignore_result")
    results = compare(servers, VARIANTS, count, runs, warmup=not options.quick)
    table = ratio_table(
        f"Throughput with peers, ignore_result=True ({count:,} tasks, solo worker)", results, count, runs
    )
    table.notes.append(
        "celery-once and celery-singleton take their lock when the task is sent; "
        "the records-server commands they run at send time are not counted here"
    )
    return [table]
