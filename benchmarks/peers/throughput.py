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


#: Further runs on the Redis broker: (pool, processes, end to end, variants).
MORE_MODES = (("solo", 1, True), ("prefork", 2, False), ("prefork", 2, True))


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
    tables = [table]
    variants = (PLAIN, IDEM_ID, ONCE, SINGLETON)
    for pool, processes, end_to_end in MORE_MODES:
        worker = "solo worker" if pool == "solo" else f"prefork worker, {processes} processes"
        how = "end to end: publish and drain" if end_to_end else "drain of pre-queued tasks"
        print(f"{TITLE}: {len(variants)} variants x {runs} runs x {count:,} tasks, {worker}, {how}")
        results = compare(
            servers,
            variants,
            count,
            runs,
            warmup=False,
            end_to_end=end_to_end,
            pool=pool,
            concurrency=processes,
        )
        table = ratio_table(
            f"Throughput with peers on the Redis broker, {how}, ignore_result=True ({count:,} tasks, {worker})",
            results,
            count,
            runs,
            span="end_to_end" if end_to_end else "body_span",
        )
        table.notes.append(
            "celery-once and celery-singleton take their lock when the task is sent"
            + (": here that is in the time and in the records-server counts" if end_to_end else "")
        )
        tables.append(table)
    return tables
