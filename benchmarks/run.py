"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--only NAME] [--write-docs]``.

Every benchmark prints its tables; ``--write-docs`` also writes them into
docs/benchmarks.md with the command, date and machine. The private Redis servers
and workers started are stopped on the way out, also after an error, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, ModuleType

import celery_idem

from . import duplicates, effects, rabbitmq, redis_cost, renewal, throughput, topologies
from .docs import Section, write
from .harness import ROOT, Options, Servers
from .peers import REQUIREMENTS, missing
from .peers import throughput as peers_throughput
from .report import command_line, machine

BENCHMARKS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (
        throughput,
        redis_cost,
        renewal,
        duplicates,
        peers_throughput,
        rabbitmq,
        effects,
        topologies,
    )
}
DEFAULT = ("throughput", "redis-cost", "renewal", "duplicates")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run celery_idem's benchmarks and print their tables (docs/benchmarks.md explains them).",
    )
    parser.add_argument("--quick", action="store_true", help="fewer tasks and runs, no warm-up: a rough look")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--peers", action="store_true", help=f"also run the peers comparison (needs {REQUIREMENTS})"
    )
    parser.add_argument(
        "--rabbitmq",
        action="store_true",
        help="also run the throughput comparison on RabbitMQ (IDEM_BENCH_AMQP_URL, "
        "default amqp://guest:guest@127.0.0.1:5672//)",
    )
    parser.add_argument("--tasks", type=int, metavar="N", help="tasks per run (overrides the default)")
    parser.add_argument("--runs", type=int, metavar="N", help="runs per variant (overrides the default)")
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help=argparse.SUPPRESS)
    return parser


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if ROOT not in Path(celery_idem.__file__).resolve().parents:
        # The docs name this checkout's commit as the one measured.
        print(
            f"benchmarks: Python imports celery_idem from {celery_idem.__file__}, not from this "
            f"checkout ({ROOT}); run them from {ROOT}",
            file=sys.stderr,
        )
        return 2
    extra = [*(["peers"] if args.peers else []), *(["rabbitmq"] if args.rabbitmq else [])]
    names = list(dict.fromkeys(args.only or [*DEFAULT, *extra]))
    if "rabbitmq" in names:
        problem = rabbitmq.reachable(rabbitmq.AMQP_URL)
        if problem is not None:
            print(f"rabbitmq: {rabbitmq.AMQP_URL} is not reachable ({problem}); skipped", file=sys.stderr)
            names.remove("rabbitmq")
            if not names:
                return 2
    if "effects" in names:
        problem = effects.reachable()
        if problem is not None:
            print(f"effects: {effects.POSTGRES_URL} is not reachable ({problem}); skipped", file=sys.stderr)
            names.remove("effects")
            if not names:
                return 2
    if "peers" in names and missing():
        print(
            f"peers: {', '.join(missing())} not installed; to include the peers comparison run\n"
            f"    pip install -r {REQUIREMENTS}",
            file=sys.stderr,
        )
        names.remove("peers")
        if not names:
            return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    options = Options(quick=args.quick, tasks=args.tasks, runs=args.runs)
    sections = []
    with Servers() as servers:
        for name in names:
            module = BENCHMARKS[name]
            started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            load_before, clock = os.getloadavg()[0], time.monotonic()
            tables = module.run(options, servers)
            sections.append(
                Section(
                    name,
                    module.TITLE,
                    tables,
                    started,
                    time.monotonic() - clock,
                    load_before,
                    os.getloadavg()[0],
                )
            )
            print()
            for table in tables:
                print(table.markdown(), end="\n\n", flush=True)
        facts = machine(servers.redis_version(), ROOT)
    if args.write_docs:
        write(args.docs, sections, command_line(), facts)
        print(f"wrote {len(sections)} section(s) into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
