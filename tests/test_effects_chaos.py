"""Effects made once by real workers under kills, freezes and database outages.

Each order's ``t.charge`` writes a ledger row in ``self.idempotency.transaction``
with work before, inside and after the transaction, where SIGKILLs land; the
ledger has no unique constraint, so an effect made twice is a second row.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from typing import Any

import psycopg
import pytest

from celery_idem.errors import LeaseLost
from tests.conftest import POSTGRES_URL, schema_url
from tests.helpers import Proxy, next_report

pytestmark = pytest.mark.chaos


def ledger_counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT order_id, count(*) FROM ledger GROUP BY order_id").fetchall())


def ledger_rows(url: str, order_id: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM ledger WHERE order_id = %s", (order_id,))]


class Killer(threading.Thread):
    """SIGKILLs the process running every ``every``-th body seen, a random moment after it started.

    The moment falls before, inside or after the body's transaction, or after its
    end and before its commit.
    """

    def __init__(self, events: Any, every: int, limit: int, span: float) -> None:
        super().__init__(daemon=True)
        self.events, self.every, self.limit, self.span = events, every, limit, span
        self.kills = 0
        self.done = threading.Event()

    def run(self) -> None:
        seen = 0
        while not self.done.is_set() and self.kills < self.limit:
            item = self.events.blpop(["starts"], timeout=1)
            if item is None:
                continue
            seen += 1
            if seen % self.every:
                continue
            if self.done.wait(random.uniform(0, self.span)):
                return
            try:
                os.kill(json.loads(item[1])["pid"], signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def work() -> list[float]:
    return [random.uniform(0.02, 0.15), random.uniform(0.02, 0.15), random.uniform(0.02, 0.15)]


def test_kills_before_inside_and_after_the_transaction_leave_one_ledger_row_per_order(
    broker_conf, pg_url, start_worker, producer, events
):
    conf = {**broker_conf, "idempotency_database_url": pg_url}
    workers = [start_worker(conf, concurrency=2), start_worker(conf, concurrency=2)]
    app = producer(conf)
    charge = app.tasks["t.charge"]
    killer = Killer(events, every=7, limit=25, span=0.5)
    killer.start()
    orders = [f"o{i}" for i in range(200)]
    results = {order: charge.apply_async((order, 100), {"work": work()}) for order in orders}
    # Whole workers die too, and come back.
    for round_ in range(2):
        for _ in range(20):
            events.blpop(["starts"], timeout=60)
        workers[round_].kill()
        workers[round_] = start_worker(conf, concurrency=2)
    try:
        values = {order: result.get(timeout=240) for order, result in results.items()}
    finally:
        killer.stop()
    assert killer.kills > 0
    counts = ledger_counts(pg_url)
    assert {order: n for order, n in counts.items() if n != 1} == {}
    assert set(counts) == set(orders)
    for order, value in values.items():
        assert ledger_rows(pg_url, order) == [value["ledger_row"]]
    # Every later delivery gets the one recorded result.
    again = charge.apply_async(("o7", 100)).get(timeout=60)
    assert again == values["o7"]


def test_a_frozen_holder_cannot_commit_its_transaction_after_a_takeover(
    broker_conf, pg_url, start_worker, producer, events
):
    conf = {**broker_conf, "idempotency_database_url": pg_url}
    frozen = start_worker(conf)
    app = producer(conf)
    charge = app.tasks["t.charge"]
    first = charge.apply_async(("z1", 100), {"gate": True})  # waits on gate:z1
    next_report(events, "started", "z1")
    frozen.signal_group(signal.SIGSTOP)  # past its lease (2 s): it stops renewing
    try:
        start_worker(conf)
        # The run that takes over does not wait: a gate opened now would go to the
        # frozen run's pending BLPOP, which Redis serves first.
        winner = charge.apply_async(("z1", 100)).get(timeout=60)
        events.rpush("gate:z1", "1")  # for the frozen run, once it wakes up
    finally:
        frozen.signal_group(signal.SIGCONT)
    with pytest.raises(LeaseLost):
        first.get(timeout=60)
    assert ledger_rows(pg_url, "z1") == [winner["ledger_row"]]
    assert charge.apply_async(("z1", 100)).get(timeout=60) == winner


def test_postgresql_unreachable_mid_run_requeues_until_it_is_back_and_charges_once(
    broker_conf, pg_schema, start_worker, producer, events
):
    proxy = Proxy("127.0.0.1", 5432)
    try:
        url = schema_url(pg_schema, POSTGRES_URL.replace(":5432", f":{proxy.port}"))
        conf = {
            **broker_conf,
            "idempotency_database_url": url,
            "idempotency_database_options": {"connect_timeout": 2},
        }
        start_worker(conf)
        app = producer(conf)
        proxy.cut()
        result = app.tasks["t.charge"].apply_async(("p1", 100))
        # The delivery could not reach PostgreSQL: it freed the key and re-queued itself.
        assert events.blpop(["retried:p1"], timeout=60) is not None
        proxy.restore()
        value = result.get(timeout=120)
    finally:
        proxy.close()
    assert ledger_rows(schema_url(pg_schema), "p1") == [value["ledger_row"]]
