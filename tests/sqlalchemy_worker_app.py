"""A Celery app whose transactions go through a SQLAlchemy Engine, for real workers.

Built as an application commonly is: the Engine is made at import, in the
worker's main process, and used there once (a check that the database answers)
before the pool forks. ``IDEM_TEST_CONF`` holds the Celery settings, as for
``tests.worker_app``; ``IDEM_SQLALCHEMY_SCHEMA`` is the schema of the test's own.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
import sqlalchemy
from celery import Celery, signals
from sqlalchemy import text

from celery_idem import IdempotentTask

engine = sqlalchemy.create_engine(
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    connect_args={"options": f"-csearch_path={os.environ['IDEM_SQLALCHEMY_SCHEMA']}"},
)
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))  # the main process's connection stays in the pool

app = Celery("sqlalchemy_worker_app", set_as_current=False)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    idempotency_database=engine,
)
app.conf.update(json.loads(os.environ.get("IDEM_TEST_CONF", "{}")))


def add_ledger_row(conn: sqlalchemy.engine.Connection, order_id: str, cents: int) -> int:
    return int(
        conn.execute(
            text("INSERT INTO ledger (order_id, cents) VALUES (:order_id, :cents) RETURNING id"),
            {"order_id": order_id, "cents": cents},
        ).scalar_one()
    )


@app.task(base=IdempotentTask, bind=True, name="sa.charge", idempotency_key=("order_id",))
def charge(self: Any, order_id: str, cents: int) -> int:
    return self.idempotency.transaction(add_ledger_row, order_id, cents)


@signals.worker_ready.connect(weak=False)
def _announce_ready(sender: Any = None, **kwargs: Any) -> None:
    redis.Redis.from_url(app.conf.test_events_url).rpush(f"ready:{sender.hostname}", "1")
