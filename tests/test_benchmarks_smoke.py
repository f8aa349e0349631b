"""The benchmarks still run: a quick Redis-cost run and a tiny throughput run.

Only that they complete and print their tables; nothing about the numbers, which
depend on the machine (docs/benchmarks.md has the measured ones). The peers
comparison is never asked for, so its optional packages are not needed; the
RabbitMQ run needs RabbitMQ (skipped without it, except on CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def run_benchmarks(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_quick_redis_cost_run_prints_its_table() -> None:
    out = run_benchmarks("--quick", "--only", "redis-cost")
    assert "Records-server commands and round trips per delivery" in out
    assert "first execution" in out
    assert "duplicate of a finished task" in out


def test_tiny_throughput_run_prints_its_tables() -> None:
    out = run_benchmarks("--quick", "--only", "throughput", "--tasks", "20", "--runs", "1")
    assert "Throughput, ignore_result=True" in out
    assert "`IdempotentTask`, key = task id" in out
    assert "Where the time of an idempotent task goes" in out


def test_tiny_rabbitmq_run_prints_its_table() -> None:
    from benchmarks.rabbitmq import AMQP_URL, reachable

    problem = reachable(AMQP_URL)
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} and CI is set: {problem}")
        pytest.skip(f"RabbitMQ is not reachable at {AMQP_URL}: {problem}")
    out = run_benchmarks("--quick", "--only", "rabbitmq", "--tasks", "20", "--runs", "1")
    for how in ("drain of pre-queued tasks", "end to end: publish and drain"):
        for worker in ("solo worker", "prefork worker, 2 processes"):
            assert f"Throughput on RabbitMQ, {how}, ignore_result=True (20 tasks, {worker})" in out
    assert "`IdempotentTask`, key = task id" in out
