"""Throughput of one solo worker draining a pre-queued queue of no-op tasks.

Variants run in turn (ABCABC...), each run in a fresh ``celery worker -P solo``
started after its N messages were queued. The rate of a run is N over the time
from the first body's start to the last body's end, as the bodies recorded it in
the worker, so worker start-up and shutdown are not part of it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from celery_idem.store import Acquired, Outcome, RecordStore

from .app import group_of, make_app
from .harness import Options, Servers, Worker, command_delta, command_stats, median
from .report import Table, runs_text

NAME = "throughput"
TITLE = "Throughput: one solo worker draining pre-queued no-op tasks"


@dataclass(frozen=True)
class Variant:
    label: str
    task: str
    #: ``broker_transport`` of the worker, when not Celery's choice.
    transport: str | None = None
    #: Import celery_idem in the worker (its worker hooks, the event-loop fix among
    #: them, then apply to every task), also for a task that is not celery_idem's.
    loop_fix: bool = False


#: The queue the benchmarks use on a broker that is not theirs alone (RabbitMQ).
SHARED_BROKER_QUEUE = "celery-idem-benchmarks"

#: celery_idem's Redis broker transport, which workers of an app using celery_idem
#: get by default (``idempotency_atomic_redis_fetch``).
IDEM_TRANSPORT = "celery_idem.broker:Transport"

PLAIN = Variant("plain `celery.Task` (acks_late)", "bench.plain")
PLAIN_IDEM_TRANSPORT = Variant(
    "plain `celery.Task`, worker on celery_idem's broker transport", "bench.plain", IDEM_TRANSPORT
)
IDEM_ID = Variant("`IdempotentTask`, key = task id", "bench.idem_id")
IDEM_ARGS = Variant('`IdempotentTask`, key = "args"', "bench.idem_args")
VARIANTS = (PLAIN, PLAIN_IDEM_TRANSPORT, IDEM_ID, IDEM_ARGS)


@dataclass(frozen=True)
class Drain:
    """What one worker run measured."""

    report: Mapping[str, Any]
    tasks: int
    broker_commands: Mapping[str, int]
    records_commands: Mapping[str, int]
    #: ``time.perf_counter()`` when publishing began, for an end-to-end run.
    published: float | None = None

    def rate(self, span: str = "body_span") -> float:
        """Tasks per second over ``body_span`` (first body start to last body end),
        ``delivery_span``, or ``end_to_end`` (first publish to last body end)."""
        if span == "end_to_end":
            assert self.published is not None, "not an end-to-end run"
            return self.tasks / (float(self.report["body_last"]) - self.published)
        return self.tasks / float(self.report[span])

    def per_task(self, commands: Mapping[str, int]) -> float:
        return sum(commands.values()) / self.tasks

    def round_trips_per_task(self) -> float:
        """Records-server round trips per task: the script calls where there are any (the
        commands a script runs are counted too, but cost no round trip), else every
        command (the peers run no scripts and no pipelines)."""
        scripts = sum(n for name, n in self.records_commands.items() if name in ("evalsha", "eval"))
        return (scripts if scripts else sum(self.records_commands.values())) / self.tasks


def settings(
    servers: Servers, result_backend: bool, broker_url: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """App settings of the worker and of the producer.

    The broker is the private broker server unless ``broker_url`` names another
    (RabbitMQ). The producer has no result backend even when the worker has one: a
    Redis backend in the producer would subscribe to every task's result as it is sent.
    """
    common: dict[str, Any] = {
        "broker_url": broker_url or servers.url("broker"),
        "idempotency_redis_url": servers.url("records"),
        "task_ignore_result": not result_backend,
    }
    if broker_url:
        # A broker shared with others: a queue of the benchmark's own, which it may purge.
        common["task_default_queue"] = SHARED_BROKER_QUEUE
    worker = dict(common)
    if result_backend:
        worker["result_backend"] = servers.url("broker", db=1)
    return worker, common


def publish(
    settings: Mapping[str, Any], task: str, count: int, task_ids: Sequence[str] | None = None
) -> None:
    """Queue ``count`` calls ``task(i)``, with the given task ids if any."""
    app = make_app(dict(settings), groups=group_of(task))
    try:
        sender = app.tasks[task]
        with app.producer_or_acquire() as producer:
            for i in range(count):
                sender.apply_async((i,), task_id=task_ids[i] if task_ids else None, producer=producer)
    finally:
        app.close()


def drain(
    servers: Servers,
    task: str,
    count: int,
    result_backend: bool = False,
    task_ids: Sequence[str] | None = None,
    keep_records: bool = False,
    transport: str | None = None,
    broker_url: str | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    loop_fix: bool = False,
    end_to_end: bool = False,
    pool: str = "solo",
    concurrency: int = 1,
) -> Drain:
    """Queue ``count`` tasks, then start a worker and wait until it ran them all.

    With ``end_to_end`` the worker is started first, idle, and the tasks are published
    while it runs them, so what the producer pays (the peers' locks) is in the time.
    The worker imports celery_idem only for idempotent tasks or its transport, and
    this is checked: the plain baseline is Celery as it is without celery_idem.
    With ``broker_url`` (RabbitMQ) the queue is purged instead of the broker server
    flushed, and broker commands are not counted.
    """
    servers.flush("broker")
    if broker_url:
        purge(broker_url)
    if not keep_records:
        servers.flush("records")
    worker_settings, producer_settings = settings(servers, result_backend, broker_url)
    if "peers" in group_of(task):
        for conf in (worker_settings, producer_settings):
            conf.update(peer_settings(servers))
    for conf in (worker_settings, producer_settings):
        conf.update(extra_settings or {})
    if transport:
        worker_settings["broker_transport"] = transport
    if not end_to_end:
        publish(producer_settings, task, count, task_ids)
    broker, records = servers.client("broker"), servers.client("records")
    before = command_stats(broker), command_stats(records)
    groups = tuple(dict.fromkeys((*group_of(task), *(("idem",) if loop_fix else ()))))
    published = None
    bench = {"expect": count, "groups": groups}
    with Worker(servers, worker_settings, bench, pool=pool, concurrency=concurrency) as worker:
        if end_to_end:
            published = time.perf_counter()
            publish(producer_settings, task, count, task_ids)
        report = worker.report(timeout=120 + count * 0.05)
        after = command_stats(broker), command_stats(records)
    if report["deliveries"] != count:
        raise RuntimeError(f"{task}: expected {count} deliveries, the worker reported {report['deliveries']}")
    if report["celery_idem_loaded"] != ("idem" in groups or bool(transport)):
        raise RuntimeError(
            f"{task}: the worker {'did' if report['celery_idem_loaded'] else 'did not'} use celery_idem (its worker hooks or its transport)"
        )
    return Drain(
        report, count, command_delta(before[0], after[0]), command_delta(before[1], after[1]), published
    )


def purge(broker_url: str) -> None:
    """Empty the benchmark's queue on ``broker_url`` (declaring it if it is new)."""
    app = make_app({"broker_url": broker_url, "task_default_queue": SHARED_BROKER_QUEUE})
    try:
        app.control.purge()
    finally:
        app.close()


def peer_settings(servers: Servers) -> dict[str, Any]:
    """celery-once and celery-singleton configured, per their docs, on the records server."""
    return {
        "ONCE": {
            "backend": "celery_once.backends.Redis",
            "settings": {"url": servers.url("records"), "default_timeout": 3600},
        },
        "singleton_backend_url": servers.url("records"),
    }


def compare(
    servers: Servers,
    variants: Sequence[Variant],
    count: int,
    runs: int,
    warmup: bool,
    result_backend: bool = False,
    broker_url: str | None = None,
    end_to_end: bool = False,
    pool: str = "solo",
    concurrency: int = 1,
) -> dict[Variant, list[Drain]]:
    """Run every variant ``runs`` times, alternating (ABCABC...), after one small warm-up run each."""
    how = {"end_to_end": end_to_end, "pool": pool, "concurrency": concurrency}
    if warmup:
        for variant in variants:
            drain(
                servers,
                variant.task,
                min(count, 200),
                result_backend,
                transport=variant.transport,
                broker_url=broker_url,
                loop_fix=variant.loop_fix,
                **how,
            )
    results: dict[Variant, list[Drain]] = {variant: [] for variant in variants}
    for run in range(runs):
        for variant in variants:
            result = drain(
                servers,
                variant.task,
                count,
                result_backend,
                transport=variant.transport,
                broker_url=broker_url,
                loop_fix=variant.loop_fix,
                **how,
            )
            results[variant].append(result)
            span = "end_to_end" if end_to_end else "body_span"
            print(f"  run {run + 1}/{runs} {variant.task}: {result.rate(span):,.0f} tasks/s")
    return results


def ratio_table(
    title: str,
    results: Mapping[Variant, Sequence[Drain]],
    count: int,
    runs: int,
    span: str = "body_span",
    broker_counted: bool = True,
) -> Table:
    """Median rate of each variant, and its ratio to the first (plain) variant.

    ``broker_counted`` is False when the broker is not the private Redis server
    (RabbitMQ): its commands are then shown as "n/a".
    """
    table = Table(
        title,
        [
            "task",
            "median tasks/s",
            "range",
            "ratio to plain",
            "per-round ratio, range",
            "broker commands / task",
            "records-server commands / task",
            "records-server round trips / task",
        ],
    )
    variants = list(results)
    plain = results[variants[0]]
    plain_median = median(d.rate(span) for d in plain)
    for variant in variants:
        drains = results[variant]
        rates = [d.rate(span) for d in drains]
        ratios = [d.rate(span) / p.rate(span) for d, p in zip(drains, plain)]
        table.add(
            variant.label,
            f"{median(rates):,.0f}",
            f"{min(rates):,.0f} to {max(rates):,.0f}",
            f"{median(rates) / plain_median:.2f}",
            f"{min(ratios):.2f} to {max(ratios):.2f}",
            f"{median(d.per_task(d.broker_commands) for d in drains):.2f}" if broker_counted else "n/a",
            f"{median(d.per_task(d.records_commands) for d in drains):.2f}",
            f"{median(d.round_trips_per_task() for d in drains):.2f}",
        )
    if span == "end_to_end":
        how = (
            "the worker started and idle first, then the tasks published from the benchmark process "
            "while it ran them; rate = tasks / (first publish - last body end)"
        )
    else:
        how = (
            "tasks published first; rate = tasks / (last body end - first body start), recorded in the worker"
        )
    table.notes.append(f"{runs_text(runs)} of {count:,} tasks per variant, alternating; {how}")
    table.notes.append(
        "commands / task: `INFO commandstats` deltas over the run (worker start-up included), "
        "counting the commands Lua scripts run as well as the EVALSHA calls"
    )
    return table


def round_trip_costs(servers: Servers, calls: int) -> dict[str, float]:
    """Client-side cost here of one PING, and of the store's acquire, commit and replay, in µs.

    The four are timed one after the other for each key, so that they see the same
    machine (this VM's round trip time wanders from minute to minute); medians.
    """
    client = redis.Redis.from_url(servers.url("records"))
    store = RecordStore(client, servers.url("records"))
    outcome = Outcome(b"null", "application/json", "utf-8")
    lease, keep = 30_000, 86_400_000
    samples: dict[str, list[float]] = {"ping": [], "acquire": [], "commit": [], "replay": []}
    clock = time.perf_counter
    try:
        for i in range(50):  # connect, load the scripts
            store.acquire(f"bench-rtt:warm:{i}", "w", lease, keep)
        for i in range(calls):
            key = f"bench-rtt:{i}"
            start = clock()
            client.ping()
            pinged = clock()
            claim = store.acquire(key, f"t{i}", lease, keep)
            acquired = clock()
            assert isinstance(claim, Acquired)
            store.commit(key, claim.token, False, outcome, keep)
            committed = clock()
            store.acquire(key, f"d{i}", lease, keep)
            replayed = clock()
            samples["ping"].append(pinged - start)
            samples["acquire"].append(acquired - pinged)
            samples["commit"].append(committed - acquired)
            samples["replay"].append(replayed - committed)
    finally:
        client.close()
    servers.flush("records")
    return {name: median(values) * 1e6 for name, values in samples.items()}


def cost_table(results: Mapping[Variant, Sequence[Drain]], costs: Mapping[str, float]) -> Table:
    """Per-task cycle times of the variants, and how the difference splits up."""
    cycle = {variant: 1e6 / median(d.rate() for d in results[variant]) for variant in results}
    transport = cycle[PLAIN_IDEM_TRANSPORT] - cycle[PLAIN]
    task = cycle[IDEM_ID] - cycle[PLAIN_IDEM_TRANSPORT]
    pair = costs["acquire"] + costs["commit"]
    table = Table("Where the time of an idempotent task goes (µs per task, medians)", ["", "µs"])
    table.add("plain task, whole worker cycle (1 / median rate)", f"{cycle[PLAIN]:,.0f}")
    table.add(
        "plain task on celery_idem's broker transport, whole worker cycle",
        f"{cycle[PLAIN_IDEM_TRANSPORT]:,.0f}",
    )
    table.add("`IdempotentTask` keyed on task id, whole worker cycle", f"{cycle[IDEM_ID]:,.0f}")
    table.add("**celery_idem's cost per task: `IdempotentTask` minus plain**", f"**{transport + task:,.0f}**")
    table.add("of which the broker transport (plain on it minus plain)", f"{transport:,.0f}")
    table.add("of which the task (`IdempotentTask` minus plain on the transport)", f"{task:,.0f}")
    table.add("one redis-py PING round trip to the records server, measured here", f"{costs['ping']:,.0f}")
    table.add("`RecordStore.acquire` (EVALSHA, new key), measured here", f"{costs['acquire']:,.0f}")
    table.add("`RecordStore.commit` (EVALSHA), measured here", f"{costs['commit']:,.0f}")
    table.add("the task's two round trips: acquire + commit", f"{pair:,.0f}")
    table.add(
        "the rest of the task's cost (key, lease, result encoding, renewal thread)", f"{task - pair:,.0f}"
    )
    table.add(
        "`RecordStore.acquire` of a finished key (a duplicate's one round trip)", f"{costs['replay']:,.0f}"
    )
    table.notes.append(
        "store calls timed in the benchmark process against the idle records server, "
        "median of single calls; the worker pays them while it is busy, so slightly more"
    )
    table.notes.append("differences of medians of noisy rates: read them to ±50 µs or so")
    return table


def run(options: Options, servers: Servers) -> list[Table]:
    count = options.pick(5000, 1000, options.tasks)
    runs = options.pick(5, 3, options.runs)
    warmup = not options.quick
    print(f"{TITLE}: {len(VARIANTS)} variants x {runs} runs x {count:,} tasks, ignore_result")
    results = compare(servers, VARIANTS, count, runs, warmup)
    tables = [
        ratio_table(f"Throughput, ignore_result=True ({count:,} tasks, solo worker)", results, count, runs)
    ]
    tables.append(cost_table(results, round_trip_costs(servers, 300 if options.quick else 2000)))
    if not options.quick:
        print(f"{TITLE}: the same with a Redis result backend")
        results = compare(servers, VARIANTS, count, runs, warmup, result_backend=True)
        table = ratio_table(
            f"Throughput with a Redis result backend ({count:,} tasks, solo worker)", results, count, runs
        )
        table.notes.append("results stored in db 1 of the broker's server, so they count as broker commands")
        tables.append(table)
    return tables
