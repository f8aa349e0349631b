"""Redis commands and round trips per delivery: a first execution, and a duplicate.

One solo worker drains a queue laid out in phases: a few warm-up tasks (they open
connections and load the scripts), a snapshot, N first executions, a snapshot, N
duplicates of those finished tasks, a snapshot. The snapshot task runs in the
worker between the phases and reads two counters there: ``INFO commandstats`` of
the records server (which serves nothing but the records, so every command on it
is celery_idem's; commands run by a script are counted too), and the round trips
of the records client, counted by :class:`~benchmarks.counting.CountingConnection`
per thread (the task's, and the lease renewal thread's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kombu.utils.uuid import uuid

from .app import SNAPSHOT_TASK, make_app
from .harness import Options, Servers, Worker, command_delta
from .report import Table
from .throughput import settings

NAME = "redis-cost"
TITLE = "Redis cost per delivery"

WARMUP = 20


@dataclass(frozen=True)
class Case:
    label: str
    task: str
    #: Duplicates reuse the task ids (True) or only the arguments (False).
    same_ids: bool


CASES = (
    Case("key = task id, no-op body", "bench.idem_id", same_ids=True),
    Case('key = "args", no-op body', "bench.idem_args", same_ids=False),
    Case("key = task id, body waits 1 ms on I/O", "bench.idem_id_io", same_ids=True),
)


def _queue(producer_settings: Mapping[str, Any], count: int) -> None:
    app = make_app(dict(producer_settings), groups=("idem",))
    try:
        snapshot = app.tasks[SNAPSHOT_TASK]
        with app.producer_or_acquire() as producer:
            for case in CASES:
                task = app.tasks[case.task]
                for i in range(WARMUP):
                    task.apply_async((10**9 + i,), producer=producer)
                snapshot.apply_async((f"{case.task}:start",), producer=producer)
                ids = [uuid() for _ in range(count)]
                for i in range(count):
                    task.apply_async((i,), task_id=ids[i], producer=producer)
                snapshot.apply_async((f"{case.task}:first",), producer=producer)
                for i in range(count):
                    task.apply_async((i,), task_id=ids[i] if case.same_ids else None, producer=producer)
                snapshot.apply_async((f"{case.task}:duplicate",), producer=producer)
    finally:
        app.close()


def _per(delta: Mapping[str, int], count: int) -> str:
    # One-off commands (a second connection's handshake) round to nothing per delivery.
    inside = [
        f"{name} {calls / count:.2f}"
        for name, calls in sorted(delta.items())
        if name != "evalsha" and calls / count >= 0.005
    ]
    return " · ".join(inside) or "none"


def measure(servers: Servers, count: int) -> list[tuple[Case, str, dict[str, Any]]]:
    """Per case and phase (first / duplicate): commands and round trips over ``count`` deliveries."""
    servers.flush("broker", "records")
    worker_settings, producer_settings = settings(servers, result_backend=False)
    _queue(producer_settings, count)
    with Worker(
        servers, worker_settings, {"expect": 0, "count_round_trips": True, "groups": ["idem"]}
    ) as worker:
        reports = {r["label"]: r for r in worker.reports(3 * len(CASES), timeout=120 + count * 0.1)}
    phases = []
    for case in CASES:
        for before, after in (("start", "first"), ("first", "duplicate")):
            a, b = reports[f"{case.task}:{before}"], reports[f"{case.task}:{after}"]
            phases.append(
                (
                    case,
                    after,
                    {
                        "commands": command_delta(a["commands"], b["commands"]),
                        "task": b["round_trips"]["task"] - a["round_trips"]["task"],
                        "renewer": b["round_trips"]["renewer"] - a["round_trips"]["renewer"],
                        "bodies": b["bodies"] - a["bodies"],
                        "deliveries": b["deliveries"] - a["deliveries"],
                    },
                )
            )
    return phases


def table(phases: Sequence[tuple[Case, str, dict[str, Any]]], count: int) -> Table:
    result = Table(
        f"Records-server commands and round trips per delivery ({count:,} deliveries per row, solo worker)",
        [
            "task",
            "delivery",
            "bodies run",
            "EVALSHA",
            "commands run by the scripts",
            "round trips (task thread + renewal thread)",
            "target round trips",
        ],
    )
    for case, phase, m in phases:
        if m["deliveries"] != count:
            raise RuntimeError(f"{case.task} {phase}: {m['deliveries']} deliveries, expected {count}")
        result.add(
            case.label,
            "first execution" if phase == "first" else "duplicate of a finished task",
            f"{m['bodies']:,}",
            f"{m['commands'].get('evalsha', 0) / count:.2f}",
            _per(m["commands"], count),
            f"{(m['task'] + m['renewer']) / count:.2f} ({m['task'] / count:.2f} + {m['renewer'] / count:.2f})",
            "2" if phase == "first" else "1",
        )
    result.notes.append(
        "commands: `INFO commandstats` deltas on the records server, per delivery; "
        "round trips: requests written by the records client in the worker, per delivery"
    )
    result.notes.append(
        "duplicates re-send the same task ids (key = task id) or the same arguments under new ids "
        '(key = "args"), after the first executions finished'
    )
    return result


def run(options: Options, servers: Servers) -> list[Table]:
    count = options.pick(1000, 100, options.tasks)
    print(f"{TITLE}: {len(CASES)} tasks x ({count:,} first executions + {count:,} duplicates)")
    return [table(measure(servers, count), count)]
