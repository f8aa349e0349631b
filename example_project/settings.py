"""Every setting of the example, read from the environment once, at import.

``BROKER_URL``
    The broker (default ``redis://localhost:6379/0``).
``REDIS_URL``
    Idempotency records, task results and the app's counters. Default: ``BROKER_URL``
    when it is a Redis URL, else ``redis://localhost:6379/0``.
``LEDGER_URL``
    Where charges and receipts are written: ``sqlite:///path`` (default
    ``example_project/ledger.sqlite3``, through SQLAlchemy) or ``postgresql://...``
    (through psycopg 3); ``pip install 'celery-idem[demo]'`` installs both.
``EXAMPLE_TASK_BASE``
    ``idempotent`` (default) runs the tasks on :class:`celery_idem.IdempotentTask`;
    ``plain`` runs the same tasks on :class:`celery.Task`, to compare.
``EXAMPLE_QUEUE``
    The queue tasks are sent to and workers consume (default ``celery``).
``EXAMPLE_TRACE``
    ``1``: ``charge_order`` bodies report where they are (see
    :func:`example_project.monitoring.trace`), for the demo's killer. Off by default.
"""

from __future__ import annotations

import os
from pathlib import Path

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

BROKER_URL = os.environ.get("BROKER_URL") or "redis://localhost:6379/0"
REDIS_URL = os.environ.get("REDIS_URL") or (
    BROKER_URL if BROKER_URL.startswith(_REDIS_SCHEMES) else "redis://localhost:6379/0"
)
LEDGER_URL = (
    os.environ.get("LEDGER_URL") or f"sqlite:///{Path(__file__).resolve().with_name('ledger.sqlite3')}"
)
TASK_BASE = os.environ.get("EXAMPLE_TASK_BASE") or "idempotent"
QUEUE = os.environ.get("EXAMPLE_QUEUE") or "celery"
TRACE = os.environ.get("EXAMPLE_TRACE") == "1"

if TASK_BASE not in ("idempotent", "plain"):
    raise ValueError(f"EXAMPLE_TASK_BASE must be 'idempotent' or 'plain'; got {TASK_BASE!r}")
