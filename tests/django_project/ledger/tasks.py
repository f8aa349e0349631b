"""The ledger's tasks, found by the project's ``app.autodiscover_tasks()``."""

from __future__ import annotations

import json
import os
from typing import Any

from celery import shared_task

from celery_idem import IdempotentTask

from .models import Ledger


def add_row(order_id: str, cents: int) -> int:
    return int(Ledger.objects.create(order_id=order_id, cents=cents).id)


@shared_task(base=IdempotentTask, bind=True, name="ledger.charge", idempotency_key=("order_id",))
def charge(self: Any, order_id: str, cents: int) -> dict[str, Any]:
    """Write one ledger row; the first run then waits for the test to kill its process."""
    from tests.django_project.celery_app import events

    row = self.idempotency.transaction(add_row, order_id, cents)
    r = events()
    run = r.incr(f"runs:{order_id}")
    if run == 1:
        # Committed in the database, not yet in Redis: the test kills this process now.
        r.rpush(f"committed:{order_id}", json.dumps({"pid": os.getpid(), "row": row}))
        r.blpop([f"gate:{order_id}"], timeout=60)
    return {"row": row, "run": run}
