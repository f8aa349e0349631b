"""Record-store throughput by topology: acquire + commit per task, 1, 2 and 4 processes.

Each process runs what a worker does for a first execution, without the worker: one
``acquire`` and one ``commit`` per fresh key, through ``store_for`` (the store a
worker's pool process gets), back to back for a fixed time, all processes started
together. The targets: one Redis server; a Redis Cluster of three primaries with a
replica each (``redis+cluster://``); and one primary with one replica, with
``idempotency_min_replicas=1`` (each commit followed by ``WAIT 1``, see
:meth:`celery_idem.store.RecordStore.commit`), next to the same pair without it.
Every server is a private ``redis-server`` on loopback, on the machine that also
runs the processes.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from celery_idem.keys import record_key
from celery_idem.store import Acquired, Outcome, reset_stores, store_for
from celery_idem.testing import RedisCluster, RedisServer

from .harness import Options, Servers, median
from .report import Table

NAME = "topologies"
TITLE = "Record-store throughput by topology"

PROCESSES = (1, 2, 4)
RESULT = Outcome(b'{"ok": true}', "application/json", "utf-8")
_SYNC = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


def _drive(
    url: str, min_replicas: int, name: str, ready: Any, start: Any, seconds: float, counts: Any
) -> None:
    """One process: acquire + commit fresh keys for ``seconds`` once ``start`` is set."""
    reset_stores()
    store = store_for(url, {})
    keys = (record_key("bench", "bench.topology", f"{name}-{i}") for i in range(10**9))
    warm = next(keys)
    store.acquire(warm, name, 10_000, 60_000)  # connects and loads the scripts
    store.commit(warm, 1, False, RESULT, 60_000, min_replicas=min_replicas)
    ready.put(name)
    start.wait()
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        key = next(keys)
        claim = store.acquire(key, name, 10_000, 60_000)
        assert isinstance(claim, Acquired)
        store.commit(key, claim.token, False, RESULT, 60_000, min_replicas=min_replicas)
        done += 1
    counts.put(done)


def measure(url: str, processes: int, seconds: float, min_replicas: int = 0) -> float:
    """Acquire + commit pairs per second, summed over ``processes`` processes."""
    context = multiprocessing.get_context("fork")
    ready, start, counts = context.Queue(), context.Event(), context.Queue()
    tag = f"{time.monotonic_ns()}"
    workers = [
        context.Process(target=_drive, args=(url, min_replicas, f"{tag}-{n}", ready, start, seconds, counts))
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:  # each has connected and loaded the scripts before the clock starts
        ready.get(timeout=30)
    start.set()
    total = sum(counts.get(timeout=seconds + 30) for _ in workers)
    for worker in workers:
        worker.join(30)
        if worker.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with {worker.exitcode}")
    return total / seconds


@contextmanager
def _targets() -> Iterator[list[tuple[str, str, int]]]:
    with ExitStack() as stack:
        single = stack.enter_context(RedisServer())
        primary = stack.enter_context(RedisServer(args=_SYNC))
        replica = stack.enter_context(
            RedisServer(args=(*_SYNC, "--replicaof", "127.0.0.1", str(primary.port)))
        )
        with primary.client() as client:
            deadline = time.monotonic() + 30
            while client.info("replication").get("connected_slaves") != 1 or client.wait(1, 100) != 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the replica never synced:\n{replica.log_tail()}")
                client.set("bench:sync-probe", 1)
        cluster = stack.enter_context(RedisCluster())
        yield [
            ("one Redis server", single.url, 0),
            ("Redis Cluster, 3 primaries + 3 replicas", cluster.url, 0),
            ("primary + 1 replica", primary.url, 0),
            ("primary + 1 replica, `idempotency_min_replicas=1`", primary.url, 1),
        ]


def run(options: Options, servers: Servers) -> list[Table]:
    """Measure every target with 1, 2 and 4 processes (the median of ``runs`` runs each)."""
    seconds = 0.5 if options.quick else 1.0
    runs = options.pick(2, 1, options.runs)
    print(f"{TITLE}: {runs} run(s) x {seconds} s per target and process count")
    table = Table(
        "Acquire + commit per second, summed over the processes",
        ["records on", *(f"{n} process{'es' if n > 1 else ''}" for n in PROCESSES)],
    )
    with _targets() as targets:
        for label, url, min_replicas in targets:
            cells: list[str] = []
            for processes in PROCESSES:
                rates: Sequence[float] = [measure(url, processes, seconds, min_replicas) for _ in range(runs)]
                cells.append(f"{median(list(rates)):,.0f}")
            table.add(label, *cells)
            print(f"  {label}: {', '.join(cells)}", flush=True)
    table.notes += [
        "One acquire and one commit per fresh key, as a first execution costs a worker: two round "
        "trips (on the cluster, each to the node owning the key's slot), no broker, no body.",
        f"Each cell is the median of {runs} run(s) of {seconds} s, all processes started together; "
        "the servers run on the same machine as the processes, so more processes also take CPU "
        "from Redis.",
        "With `idempotency_min_replicas=1` every commit is followed by `WAIT 1` on the same "
        "connection, in the same write: the reply comes once the replica acknowledged the commit.",
    ]
    return [table]
