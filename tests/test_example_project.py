"""The example project: its demo, run as ``make demo`` runs it, and its ledger.

Each demo run starts its own private Redis and two real worker processes, SIGKILLs
tens of pool processes mid-task and whole workers, and must end with no duplicate
row and no lost order on IdempotentTask; plain celery.Task shows its duplicates.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from example_project.ledger import Ledger, record_charge
from tests.conftest import schema_url

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def run_demo(run_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    # Without REDIS_URL the demo starts a private Redis: never the machine's shared one.
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BROKER_URL", "LEDGER_URL")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--orders", "40", "--run-dir", str(run_dir), *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )


def table_row(output: str, scenario: str) -> list[dict[str, str]]:
    """One row of the table, one dict of column -> cell per group of columns."""
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("scenario"))
    row = next(line for line in lines if line.startswith(f"{scenario}  "))
    cells = [part.split() for part in row[len(scenario) :].split("|")]
    cells[0].insert(0, scenario)
    return [dict(zip(names.split(), group)) for names, group in zip(header.split("|"), cells)]


def total_rows(output: str) -> list[dict[str, str]]:
    """The table's ``total`` row, one dict of column -> cell per group of columns."""
    return table_row(output, "total")


def outcome(run_dir: Path, task_base: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((run_dir / f"storm-{task_base}.json").read_text())
    return result


def scenario(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["scenarios"] if s["scenario"] == name)


def explain(run: subprocess.CompletedProcess[str], run_dir: Path) -> str:
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in run_dir.glob("*.log"))
    return f"exit {run.returncode}\n{run.stdout}\n{run.stderr[-4000:]}{logs}"


def test_demo_storm_with_kills_mid_task_and_killed_workers_leaves_no_duplicate_row_and_no_lost_order(
    tmp_path,
):
    run = run_demo(tmp_path)
    assert run.returncode == 0, explain(run, tmp_path)
    (total,) = total_rows(run.stdout)
    assert (total["duplicates"], total["lost"]) == ("0", "0"), run.stdout
    assert int(total["cached"]) > 0 and int(total["rows"]) == 2 * 40 + 1
    result = outcome(tmp_path, "idempotent")
    mid_task = scenario(result, "killed mid-task")
    # Every order of the scenario (8 of 40) has its body killed once, and a worker dies whole.
    assert mid_task["killed_processes"] >= 6 and mid_task["killed_workers"] == 1, run.stdout
    assert mid_task["taken_over"] > 0, run.stdout
    assert result["killed"]["worker killed"]["worker"]["pid"], "no worker was killed whole"


def test_demo_compare_shows_plain_task_duplicates_after_kills_next_to_none_for_idempotent_task(tmp_path):
    run = run_demo(tmp_path, "--compare")
    assert run.returncode == 0, explain(run, tmp_path)
    _, plain, idempotent = total_rows(run.stdout)
    assert (idempotent["duplicates"], idempotent["lost"]) == ("0", "0"), run.stdout
    # Every duplicate message of the storm runs again on a plain task.
    assert int(plain["duplicates"]) > 0 and plain["lost"] == "0", run.stdout
    # A kill after the charge committed and before the message was acknowledged
    # makes a plain task charge again.
    _, plain_mid_task, idempotent_mid_task = table_row(run.stdout, "killed mid-task")
    assert int(plain_mid_task["duplicates"]) > 0, run.stdout
    assert idempotent_mid_task["duplicates"] == "0", run.stdout
    killed = outcome(tmp_path, "plain")["killed"]["killed mid-task"]
    after = [order for order, moment in killed["victims"] if moment == "after"]
    assert after, run.stdout
    charges = Ledger(f"sqlite:///{tmp_path / 'ledger-plain.sqlite3'}")
    try:
        assert all(charges.tally("charges", [order]).rows >= 2 for order in after), run.stdout
    finally:
        charges.close()


@pytest.mark.rabbitmq
def test_demo_over_rabbitmq_leaves_no_duplicate_row_and_no_lost_order(tmp_path):
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
    except OSError as exc:
        reason = f"RabbitMQ is not reachable at 127.0.0.1:5672 ({exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run this test")
        print(reason)
        pytest.skip(reason)
    run = run_demo(tmp_path, "--broker", RABBITMQ)
    assert run.returncode == 0, explain(run, tmp_path)
    (total,) = total_rows(run.stdout)
    assert (total["duplicates"], total["lost"]) == ("0", "0"), run.stdout
    assert scenario(outcome(tmp_path, "idempotent"), "killed mid-task")["killed_processes"] >= 6


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    ledger.create_schema()
    yield ledger
    ledger.close()


def test_sqlite_ledger_transaction_holds_the_write_lock_from_its_begin(ledger, tmp_path):
    # A transaction that read first and then wrote could otherwise fail at once with
    # "database is locked" when another process wrote meanwhile; taking the lock
    # when it begins makes it wait (busy timeout) instead.
    other = sqlite3.connect(tmp_path / "ledger.sqlite3", timeout=0, isolation_level=None)
    try:
        with ledger.transaction():
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("COMMIT")
    finally:
        other.close()


def test_ledger_keeps_every_plain_write_so_duplicates_show(ledger):
    first = ledger.write(record_charge, 9, 500)
    second = ledger.write(record_charge, 9, 500)
    assert second != first
    tally = ledger.tally("charges", [9, 10])
    assert (tally.rows, tally.distinct, tally.duplicates, tally.missing) == (2, 1, 1, (10,))
    assert [row["id"] for row in ledger.rows("charges", 9)] == [first, second]


def test_ledger_on_postgresql_writes_and_counts_through_psycopg(pg_schema):
    ledger = Ledger(schema_url(pg_schema))
    try:
        ledger.create_schema()
        assert ledger.engine is None
        first = ledger.write(record_charge, 9, 500)
        ledger.write(record_charge, 9, 500)
        assert ledger.tally("charges", [9]).duplicates == 1
        assert ledger.rows("charges", 9)[0]["id"] == first
        assert ledger.highest_order_id() == 9
    finally:
        ledger.close()
